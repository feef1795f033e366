"""Every API the README names is exercised here, not only its code blocks (test_readme.py runs those).

The README once documented ``create_model(name, layout="residual_reorg")`` long after it had gone. Now every
inline span of the README that calls this package's API (a ``repvgg.`` name, a public name of the package or
a public method of its model classes) must be a key of :data:`EXERCISES`, whose function does what the span
says; every dotted ``repvgg.x.y`` name in the README must resolve. A span added, changed or left behind by an
API change fails here.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import repvgg
from repvgg.core.backbone import FeatureInfo, RepVGGFeatures
from repvgg.core.blocks import RepVGGBlock
from repvgg.core.models import RepVGG
from repvgg.core.segmentation import PSPNet
from tests.helpers import relative_error, small_model, trained_looking

README = Path(__file__).resolve().parents[1] / "README.md"


def _prose() -> str:
    """The README without its fenced code blocks (those are run by test_readme.py)."""
    return re.sub(r"```.*?```", "", README.read_text(), flags=re.DOTALL)


def _spans() -> list[str]:
    """Every inline code span, its whitespace (line breaks) made single spaces."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", _prose())]


def _api_names() -> set[str]:
    """The package's public names and the public methods its model classes define."""
    names = set(repvgg.__all__)
    for cls in (RepVGG, RepVGGBlock, RepVGGFeatures, PSPNet, FeatureInfo):
        for klass in cls.__mro__:
            if klass.__module__.startswith("repvgg"):
                names |= {name for name in vars(klass) if not name.startswith("_")}
    return names


def api_calls() -> list[str]:
    """The README's inline spans that call this package's API."""
    names, calls = _api_names(), []
    for span in _spans():
        match = re.match(r"^\.?([\w.]+)\(", span)
        if match and (match[1].startswith("repvgg.") or match[1].split(".")[-1] in names):
            calls.append(span)
    return sorted(set(calls))


def dotted_names() -> list[str]:
    """Every ``repvgg.a.b`` name in the README's prose."""
    return sorted(set(re.findall(r"(?<![\w./])repvgg(?:\.[A-Za-z_]\w*)+", _prose())))  # not .repvgg.lock


def _resolve(dotted: str) -> object:
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise AssertionError(f"{dotted} names nothing")


# ---------------------------------------------------------------------------------------------------------
# What each span says, done.


def _model() -> RepVGG:
    return trained_looking("repvgg_a0", num_classes=10)


def _block() -> RepVGGBlock:
    block = RepVGGBlock(8, 8, 3, padding=1)
    repvgg.randomize_batchnorm_(block, seed=2)
    return block.eval()


def _converts(convert: Callable[[RepVGGBlock], object]) -> None:
    block = _block().double()
    inputs = torch.randn(1, 8, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = block(inputs)
        convert(block)
        assert block.deploy and relative_error(block(inputs), expected) < 1e-10


def _fused_kernel(get: Callable[[RepVGGBlock], tuple[torch.Tensor, torch.Tensor]]) -> None:
    block = _block().double()
    kernel, bias = get(block)
    inputs = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        plain = torch.nn.functional.conv2d(inputs, kernel, bias, padding=1).relu()
        assert relative_error(plain, block(inputs)) < 1e-10


def _authors_signature(cls: type, names: str) -> None:
    parameters = list(inspect.signature(cls).parameters)
    assert parameters[: len(names.split(", "))] == names.split(", ")


def _repvgg_positional() -> None:
    _authors_signature(
        RepVGG,
        "num_blocks, num_classes, width_multiplier, override_groups_map, deploy, use_se, use_checkpoint",
    )
    model = RepVGG([1, 1, 1, 1], 7, [0.25, 0.25, 0.25, 0.5], {1: 2}, False, False, False)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7) and model.stage1[0].rbr_dense.conv.groups == 2


def _block_positional() -> None:
    _authors_signature(
        RepVGGBlock,
        "in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, deploy, "
        "use_se",
    )
    block = RepVGGBlock(8, 16, 3, 2, 1, 1, 2, "zeros", True, True)
    assert block(torch.randn(1, 8, 8, 8)).shape == (1, 16, 4, 4) and block.deploy


def _create_model_defaults() -> None:
    signature = inspect.signature(repvgg.create_model)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not p.empty}
    assert {"num_classes": 1000, "deploy": False, "in_chans": 3}.items() <= defaults.items()
    plain = repvgg.create_model("repvgg_a0", num_classes=10, deploy=True, in_chans=1, strides=(1, 1, 2, 2, 2))
    assert plain.deploy and plain.in_chans == 1 and plain.strides == (1, 1, 2, 2, 2)


def _create_model_timm_keywords() -> None:
    model = repvgg.create_model("repvgg_a0", 10, in_chans=1)
    assert model.num_classes == 10 and model.in_chans == 1
    backbone = repvgg.create_model("repvgg_a0", features_only=True, out_indices=(2, 4), output_stride=16)
    features = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [96, 1280] and features[-1].shape[-1] == 4


def _create_model_backbone_options() -> None:
    backbone = repvgg.create_model(
        "repvgg_a0", features_only=True, out_indices=(1, 3), frozen_stages=1, norm_eval=True
    ).train()
    assert not any(p.requires_grad for p in backbone.stage1.parameters())
    assert not any(m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _create_model_block() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10, block="qarepvgg").eval()
    assert model.stage1[0].block == "qarepvgg" and repvgg.verify_equivalence(model).passed


def _pretrained_file(tmp_path: Path) -> None:
    weights = tmp_path / "RepVGG-A0-train.pth"  # the test runs in tmp_path: the span's relative name
    torch.save(repvgg.convert_state_dict(_model().state_dict(), to="official"), weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that a new 4-class head replaced the 10-class one
        model = repvgg.create_model("repvgg_a0", pretrained="RepVGG-A0-train.pth", num_classes=4)
    assert model.num_classes == 4


def _convert_state_dict() -> None:
    state = _model().state_dict()
    for to in ("official", "timm", "mmpretrain", "native"):
        renamed = repvgg.convert_state_dict(state, to=to)
        assert len(renamed) == len(state)
        again = repvgg.load_checkpoint(renamed)
        assert again.state_dict().keys() == state.keys()


def _load_onnx(tmp_path: Path) -> None:
    model = small_model()
    repvgg.export_model(model, tmp_path / "a0.onnx", to="onnx")
    loaded = repvgg.load_checkpoint(str(tmp_path / "a0.onnx"))
    inputs = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert relative_error(loaded(inputs), model(inputs)) < 1e-4


def _save_and_load(tmp_path: Path) -> None:
    model = small_model()
    path = repvgg.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = repvgg.load_checkpoint(path)
    assert loaded.class_names == model.class_names
    into = small_model(seed=5)
    assert repvgg.load_checkpoint(path, model=into) is into
    assert all(
        torch.equal(a, b)
        for a, b in zip(into.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert repvgg.load_checkpoint(path, model=None).config == model.config


def _load_into_backbone(tmp_path: Path) -> None:
    path = repvgg.save_checkpoint(_model(), tmp_path / "c.safetensors")
    backbone = repvgg.create_model("repvgg_a0", features_only=True)
    with pytest.warns(repvgg.RepVGGWarning, match="classifier head"):
        repvgg.load_checkpoint(path, backbone)


def _adapt_in_chans(tmp_path: Path) -> None:
    path = repvgg.save_checkpoint(_model(), tmp_path / "rgb.safetensors")
    grey = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1)
    with pytest.warns(repvgg.RepVGGWarning):
        repvgg.load_checkpoint(path, grey, adapt_in_chans=True)


def _optimize_eager() -> None:
    model, x = small_model(), torch.randn(4, 1, 28, 28)
    fast = repvgg.optimize(model, backend="auto", example_input=x)
    with torch.no_grad():
        assert (
            fast.backend in ("eager", "inductor", "onnxruntime") and relative_error(fast(x), model(x)) < 1e-4
        )


def _optimize_precision() -> None:
    model = small_model()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    chosen = repvgg.optimize(
        model,
        precision="auto",
        example_input=batches[0][0],
        calibration=[images for images, _ in batches],
        eval_data=batches,
        max_top1_drop=0.5,
    )
    assert chosen.report and chosen.precision in ("fp32", "bf16", "int8")


def _pspnet() -> None:
    network = repvgg.pspnet("repvgg_a0", 5)
    assert isinstance(network, repvgg.PSPNet) and network.eval()(torch.randn(1, 3, 32, 32)).shape == (
        1,
        5,
        32,
        32,
    )


def _reparameterize() -> None:
    model = _model()
    converted = repvgg.reparameterize(model, inplace=False)
    assert converted.deploy and not model.deploy
    assert repvgg.reparameterize(model, inplace=True) is model and model.deploy


def _verify_equivalence() -> None:
    model = _model()
    assert repvgg.verify_equivalence(model, converted=None).passed
    assert repvgg.verify_equivalence(model, converted=repvgg.reparameterize(model)).passed


def _residual_reorg() -> None:
    from repvgg.studies.ablation import ResidualReorg

    model = repvgg.studies.ablation.ResidualReorg("repvgg_b0", 10)
    assert isinstance(model, ResidualReorg) and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _model_convert(tmp_path: Path) -> None:
    model = _model()
    converted = repvgg.repvgg_model_convert(model, str(tmp_path / "d.safetensors"), True)
    assert converted.deploy and not model.deploy and repvgg.load_checkpoint(tmp_path / "d.safetensors").deploy


def _heads() -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape == (2, 1280)
    assert model.get_classifier() is model.linear
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def _intermediates() -> None:
    model, x = _model(), torch.randn(1, 3, 64, 64)
    last, stages = model.forward_intermediates(x, [1, 3], intermediates_only=False, stop_early=False)
    assert len(stages) == 2 and last.shape[1] == 1280
    only = model.forward_intermediates(x, 2, intermediates_only=True, stop_early=True)
    assert [t.shape[1] for t in only] == [192, 1280]


def _grad_checkpointing() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10)
    model.set_grad_checkpointing()
    assert model.use_checkpoint
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def _model_switch_to_deploy() -> None:
    model = _model()
    expected = model(torch.ones(1, 3, 32, 32))
    model.switch_to_deploy()
    assert model.deploy and relative_error(model(torch.ones(1, 3, 32, 32)), expected) < 1e-4


def _train_keeps_frozen() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10, frozen_stages=0).eval()
    model.switch_to_deploy()
    model.train()
    assert not model.stage0.rbr_reparam.weight.requires_grad and not model.stage0.training


def _feature_info() -> None:
    info = repvgg.create_model("repvgg_a0", features_only=True, out_indices=(2, 3)).feature_info
    assert info.channels() == [96, 192] and info.reduction() == [8, 16]
    assert info.module_name() == ["stage2", "stage3"]


def _list_models() -> None:
    assert repvgg.list_models()[:2] == ["repvgg_a0", "repvgg_a1"] and len(repvgg.list_models()) == 14


def _block_custom_l2() -> None:
    assert _block().get_custom_L2().item() > 0


def _argument_checks(tmp_path: Path) -> None:
    with pytest.raises(repvgg.ArgumentTypeError, match="`num_classes` must be a whole number"):
        repvgg.create_model("repvgg_a0", num_classes="10")
    with pytest.raises(repvgg.ArgumentTypeError, match="`model` must be a PyTorch module"):
        repvgg.save_checkpoint(None, tmp_path / "m.safetensors")
    with pytest.raises(repvgg.ArgumentValueError, match="`example_input` has 3 channels"):
        repvgg.optimize(small_model(), example_input=torch.randn(2, 3, 28, 28))


EXERCISES: dict[str, Callable[..., None]] = {
    'create_model(num_classes="10")': _argument_checks,
    "save_checkpoint(None, ...)": _argument_checks,
    "optimize(model, example_input=x)": _argument_checks,
    "RepVGG(num_blocks, num_classes, width_multiplier, override_groups_map, deploy, use_se, "
    "use_checkpoint)": _repvgg_positional,
    "RepVGGBlock(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, "
    "deploy, use_se)": _block_positional,
    "block.equivalent_kernel_bias()": lambda: _fused_kernel(lambda b: b.equivalent_kernel_bias()),
    "block.get_equivalent_kernel_bias()": lambda: _fused_kernel(lambda b: b.get_equivalent_kernel_bias()),
    "block.get_custom_L2()": _block_custom_l2,
    "block.reparameterize()": lambda: _converts(lambda b: b.reparameterize()),
    "block.switch_to_deploy()": lambda: _converts(lambda b: b.switch_to_deploy()),
    "switch_to_deploy()": lambda: _converts(lambda b: b.switch_to_deploy()),
    "create_model(name, block=...)": _create_model_block,
    "create_model(name, features_only=True, out_indices=..., frozen_stages=..., norm_eval=...)": (
        _create_model_backbone_options
    ),
    "create_model(name, num_classes, in_chans, features_only, out_indices, output_stride)": (
        _create_model_timm_keywords
    ),
    "create_model(name, num_classes=1000, deploy=False, in_chans=3, **options)": _create_model_defaults,
    "forward_features()": _heads,
    "forward_head(x, pre_logits=True)": _heads,
    "get_classifier()": _heads,
    "reset_classifier(n)": _heads,
    "model.reset_classifier(n)": _heads,
    "forward_intermediates(x, indices, intermediates_only=, stop_early=)": _intermediates,
    "set_grad_checkpointing()": _grad_checkpointing,
    "model.set_grad_checkpointing()": _grad_checkpointing,
    "model.switch_to_deploy()": _model_switch_to_deploy,
    "train()": _train_keeps_frozen,
    "feature_info.channels()": _feature_info,
    ".reduction()": _feature_info,
    ".module_name()": _feature_info,
    "load_checkpoint(path, model, adapt_in_chans=True)": _adapt_in_chans,
    'repvgg.convert_state_dict(state_dict, to="official" | "timm" | "mmpretrain" | "native")': (
        _convert_state_dict
    ),
    'repvgg.create_model("repvgg_a0", pretrained="RepVGG-A0-train.pth", num_classes=4)': _pretrained_file,
    "repvgg.list_models()": _list_models,
    'repvgg.load_checkpoint("a0.onnx")': _load_onnx,
    "repvgg.load_checkpoint(path)": _save_and_load,
    "repvgg.load_checkpoint(source, model=None)": _save_and_load,
    "repvgg.save_checkpoint(model, path)": _save_and_load,
    "repvgg.load_checkpoint(path, backbone)": _load_into_backbone,
    'repvgg.optimize(model, backend="auto", example_input=x)': _optimize_eager,
    'repvgg.optimize(model, precision="auto", example_input=x, calibration=train_batches, '
    "eval_data=val_loader, max_top1_drop=0.5)": _optimize_precision,
    'repvgg.pspnet("repvgg_a0", num_classes)': _pspnet,
    "repvgg.reparameterize(module, inplace=False)": _reparameterize,
    "repvgg.verify_equivalence(model, converted=None)": _verify_equivalence,
    "repvgg.studies.ablation.ResidualReorg(name, num_classes)": _residual_reorg,
    "repvgg_model_convert(model, save_path, do_copy)": _model_convert,
}


def test_every_api_call_the_readme_names_is_exercised_here() -> None:
    calls = api_calls()
    assert len(calls) >= 30, "the README's API spans were not found"
    missing = [span for span in calls if span not in EXERCISES]
    assert not missing, f"README spans with no exercise in this file: {missing}"
    stale = [span for span in EXERCISES if span not in calls]
    assert not stale, f"exercises of spans the README no longer has: {stale}"


@pytest.mark.parametrize("span", sorted(EXERCISES))
def test_the_readme_api_works_as_it_says(span: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exercise = EXERCISES[span]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if "tmp_path" in inspect.signature(exercise).parameters:
            exercise(tmp_path)
        else:
            exercise()


@pytest.mark.parametrize("dotted", dotted_names())
def test_every_dotted_name_in_the_readme_exists(dotted: str) -> None:
    assert _resolve(dotted) is not None


def test_the_readme_names_no_create_model_keyword_it_refuses() -> None:
    """The bug that started this file: a keyword shown with create_model that create_model refuses."""
    for span in _spans():
        for arguments in re.findall(r"create_model\(([^)]*)\)", span):
            for keyword in re.findall(r"\b(\w+)=", arguments):
                assert keyword in _api_keywords(), f"{span}: create_model takes no {keyword}="


def _api_keywords() -> set[str]:
    keywords = set(inspect.signature(repvgg.create_model).parameters) | {"pretrained"}
    for cls in (RepVGG, RepVGGFeatures):
        keywords |= set(inspect.signature(cls).parameters)
    return keywords
