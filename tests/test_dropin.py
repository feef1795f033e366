"""Code written against the authors', mmpretrain's and timm's RepVGG runs here and gets the right answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import repvgg
from repvgg.core.int8 import quantize_ptq
from repvgg.exceptions import ModelConfigError
from tests.helpers import relative_error


def authors_pspnet_surgery(model: repvgg.RepVGG) -> None:
    """What the authors' example_pspnet.py does to a RepVGG: dilate stages 3 and 4, in place, conv by conv."""
    for stage, rate in ((model.stage3, 2), (model.stage4, 4)):
        for name, module in stage.named_modules():
            if "rbr_dense" in name or "rbr_reparam" in name:
                if isinstance(module, nn.Conv2d):
                    module.dilation, module.padding, module.stride = (rate, rate), (rate, rate), (1, 1)
            elif "rbr_1x1" in name and isinstance(module, nn.Conv2d):
                module.stride = (1, 1)


def authors_conversion_loop(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1g2"])
@pytest.mark.parametrize("convert", ["reparameterize", "authors_loop"])
def test_conversion_after_the_authors_pspnet_surgery_is_exact(name: str, convert: str) -> None:
    model = repvgg.randomize_batchnorm_(repvgg.create_model(name, num_classes=10), seed=3).double().eval()
    authors_pspnet_surgery(model)
    inputs = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model.forward_features(inputs)
        if convert == "reparameterize":
            deployed = repvgg.reparameterize(model)
        else:
            authors_conversion_loop(model)
            deployed = model
        actual = deployed.forward_features(inputs)
    assert expected.shape[-2:] == (8, 8), "stages 3-4 dilated: output stride 8"
    assert actual.shape == expected.shape and relative_error(actual, expected) < 1e-10
    assert deployed.deploy


def test_branches_edited_differently_are_refused_not_fused_wrongly() -> None:
    block = repvgg.RepVGGBlock(8, 8).eval()
    block.rbr_dense.conv.dilation, block.rbr_dense.conv.padding = (2, 2), (2, 2)
    block.rbr_1x1.conv.stride = (2, 2)
    with pytest.raises(repvgg.ConversionError, match="no longer line up"):
        block.reparameterize()


def test_the_authors_block_api() -> None:
    block = repvgg.randomize_batchnorm_(repvgg.RepVGGBlock(8, 8), seed=1).eval()
    kernel, bias = block.get_equivalent_kernel_bias()
    expected_kernel, expected_bias = block.equivalent_kernel_bias()
    assert torch.equal(kernel, expected_kernel) and torch.equal(bias, expected_bias)
    assert torch.equal(block.get_custom_L2(), block.custom_l2())
    block.switch_to_deploy()
    assert block.deploy and hasattr(block, "rbr_reparam")


def test_the_model_s_form_is_derived_from_its_blocks() -> None:
    model = repvgg.randomize_batchnorm_(repvgg.create_model("repvgg_a0", num_classes=10), seed=2).eval()
    assert not model.deploy
    for block in model.modules():
        if isinstance(block, repvgg.RepVGGBlock):
            block.reparameterize()  # per block, as timm's reparameterize_model does
    assert model.deploy and model.info.form == "deploy"
    quantized = quantize_ptq(model, [torch.randn(2, 3, 32, 32)])  # refused before as "training form"
    assert quantized.info.precision == "int8"
    mm = repvgg.create_model("repvgg_a0", num_classes=10).eval()
    mm.switch_to_deploy()  # mmpretrain's model-level name
    assert mm.deploy


def test_gradient_checkpointing_works_in_backbones() -> None:
    """Counted with saved_tensors_hooks: a no-op would pass a gradient comparison, not this."""

    def saved_tensors(use_checkpoint: bool) -> int:
        model = repvgg.create_model("repvgg_a0", features_only=True, out_indices=(1, 2, 3, 4))
        model.set_grad_checkpointing(use_checkpoint)
        count = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal count
            count += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = model.train()(torch.randn(2, 3, 64, 64))
        sum(o.sum() for o in outputs).backward()
        return count

    plain, checkpointed = saved_tensors(False), saved_tensors(True)
    assert checkpointed * 10 < plain, (plain, checkpointed)


def test_wrong_constructor_arguments_are_one_sentence() -> None:
    with pytest.raises(ModelConfigError, match="takes a model name such as 'repvgg_a0'"):
        repvgg.create_model([4, 6, 16, 1])  # type: ignore[arg-type]
    with pytest.raises(ModelConfigError, match=r"override_groups_map names layers \[40\]"):
        repvgg.RepVGG([2, 4, 14, 1], width_multiplier=[0.75, 0.75, 0.75, 2.5], override_groups_map={40: 2})


def test_timm_s_classifier_accessors() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10)
    assert model.get_classifier() is model.linear
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3


@pytest.mark.parametrize(("in_chans", "exact"), [(1, True), (6, True), (2, False)])
def test_pretrained_rgb_weights_load_into_other_input_channels_when_asked(
    in_chans: int, exact: bool, tmp_path: Path
) -> None:
    rgb = repvgg.randomize_batchnorm_(repvgg.create_model("repvgg_a0", num_classes=10), seed=4).eval()
    path = repvgg.save_checkpoint(rgb, tmp_path / "rgb.safetensors")
    model = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=in_chans)
    with pytest.raises(repvgg.CheckpointError, match=r"another number of input channels .* `adapt_in_chans`"):
        repvgg.load_checkpoint(path, model)
    with pytest.warns(repvgg.RepVGGWarning, match=f"stem takes 3 input channels and the model {in_chans}"):
        repvgg.load_checkpoint(path, model, adapt_in_chans=True)
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # timm's rule keeps a grey image's output for 1 channel and multiples of 3
        error = relative_error(
            model.eval()(grey.expand(-1, in_chans, -1, -1)), rgb(grey.expand(-1, 3, -1, -1))
        )
    assert (error < 1e-5) == exact


def test_timm_s_feature_info_accessors() -> None:
    backbone = repvgg.create_model("repvgg_a0", features_only=True, out_indices=(2, 4), output_stride=16)
    info = backbone.feature_info
    assert info.channels() == [96, 1280] and info.reduction() == [8, 16]
    assert info.module_name() == ["stage2", "stage4"] and info[0]["num_chs"] == 96  # still timm's dicts


def test_timm_s_forward_intermediates() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10).eval()
    inputs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, stages = model.forward_intermediates(inputs, indices=2)
        features = model.forward_features(inputs)
        early = model.forward_intermediates(inputs, indices=[1], intermediates_only=True, stop_early=True)
    assert torch.equal(final, features) and torch.equal(stages[-1], features)
    assert [s.shape[1] for s in stages] == [192, 1280] and early[0].shape[-1] == 16
    with pytest.raises(ModelConfigError, match="stages 0-4"):
        model.forward_intermediates(inputs, indices=[7])


@pytest.mark.parametrize(
    ("name", "block"), [("repvgg_a0", "repvgg"), ("repvgg_a0", "qarepvgg"), ("repvgg_b1g2", "repvgg")]
)
def test_torch_jit_script_compiles_both_forms_and_leaves_the_model_alone(
    name: str, block: str, tmp_path: Path
) -> None:
    import io
    import warnings

    model = repvgg.randomize_batchnorm_(repvgg.create_model(name, num_classes=10, block=block), seed=5).eval()
    inputs = torch.randn(2, 3, 64, 48)
    for form in (model, repvgg.reparameterize(model)):
        before = {k: v.clone() for k, v in form.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still used
            scripted = torch.jit.script(form)
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
            loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
        with torch.no_grad():
            assert relative_error(loaded(inputs), form(inputs)) < 1e-6
        assert isinstance(form.stage0, repvgg.RepVGGBlock), "scripting compiled a copy"
        assert all(torch.equal(before[k], v) for k, v in form.state_dict().items())


def test_torch_jit_script_compiles_a_backbone() -> None:
    import warnings

    backbone = repvgg.create_model("repvgg_a0", features_only=True, out_indices=(1, 3)).eval()
    inputs = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(backbone)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(scripted(inputs), backbone(inputs), strict=True))


def test_mmpretrain_s_backbone_options(tmp_path: Path) -> None:
    model = repvgg.create_model(
        "repvgg_b0", num_classes=10, strides=(2, 2, 2, 1, 1), dilations=(1, 1, 1, 2, 4), base_channels=32
    )
    assert model.stage3[0].rbr_dense.conv.dilation == (2, 2) and model.stage4[0].rbr_dense.conv.dilation == (
        4,
        4,
    )
    assert model.stage1[0].out_channels == 32 and model.stage4[0].out_channels == 8 * 32 * 2.5
    se = repvgg.create_model("repvgg_d2se", se_reduction=4, num_classes=10)
    assert se.stage1[0].se.down.out_channels == se.stage1[0].out_channels // 4
    for network in (model, se):  # the options are part of the record: the file rebuilds the same network
        repvgg.randomize_batchnorm_(network, seed=6).eval()
        loaded = repvgg.load_checkpoint(repvgg.save_checkpoint(network, tmp_path / "m.safetensors"))
        assert loaded.config == network.config
        assert repvgg.verify_equivalence(network).passed
    backbone = repvgg.create_model("repvgg_a0", features_only=True, base_channels=32, out_indices=(4,))
    assert backbone.feature_info.channels() == [int(8 * 32 * 2.5)]
    with pytest.raises(ModelConfigError, match="without output_stride"):
        repvgg.create_model("repvgg_a0", dilations=(1, 1, 1, 2, 4), output_stride=8)
    with pytest.raises(ModelConfigError, match="five stages"):
        repvgg.create_model("repvgg_a0", dilations=(1, 2))


def test_timm_s_reparameterize_model_converts_ours() -> None:
    from timm.utils.model import reparameterize_model

    model = repvgg.randomize_batchnorm_(repvgg.create_model("repvgg_a0", num_classes=10), seed=7).eval()
    converted = reparameterize_model(model)
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (
            converted.deploy and not model.deploy and relative_error(converted(inputs), model(inputs)) < 1e-5
        )


def test_list_models_takes_timm_s_patterns() -> None:
    assert repvgg.list_models("*b1*") == ["repvgg_b1", "repvgg_b1g2", "repvgg_b1g4"]
    assert repvgg.list_models() == list(repvgg.MODEL_SPECS) and repvgg.list_models("resnet*") == []


def test_mmpretrain_s_base_channels_keep_the_stem_at_most_64_wide() -> None:
    """mmpretrain's stem is ``min(64, int(base_channels * width[0]))``: a ported config with
    ``base_channels=128`` on A0 has a 64-wide stem and 96-wide stage 1, so its checkpoints load."""
    model = repvgg.create_model("repvgg_a0", num_classes=10, base_channels=128)
    assert model.stage0.out_channels == 64 and model.stage1[0].out_channels == int(128 * 0.75)
    assert model.stage4[0].out_channels == int(8 * 128 * 2.5)
    mmpretrain_names = repvgg.convert_state_dict(model.state_dict(), to="mmpretrain")
    assert tuple(mmpretrain_names["backbone.stem.branch_3x3.conv.weight"].shape[:2]) == (64, 3)
    again = repvgg.create_model("repvgg_a0", num_classes=10, base_channels=128)
    repvgg.load_checkpoint(mmpretrain_names, again)
    loaded, expected = again.state_dict(), model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert repvgg.verify_equivalence(model.eval()).passed


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.switch_to_deploy(),
        lambda m: authors_conversion_loop(m),
        lambda m: repvgg.reparameterize(m, inplace=True),
    ],
    ids=["switch_to_deploy", "authors_loop", "reparameterize"],
)
@pytest.mark.parametrize("features_only", [False, True])
def test_frozen_stages_stay_frozen_through_conversion_and_train(convert, features_only: bool) -> None:
    """mmpretrain re-freezes in every ``train()``: the plain convs of frozen stages get no gradients."""
    model = repvgg.create_model("repvgg_a0", num_classes=10, frozen_stages=1, features_only=features_only)
    model.eval()
    convert(model)
    for _ in range(2):
        model.train()
        frozen = [p for stage in model.stages()[:2] for p in stage.parameters()]
        trainable = [p for stage in model.stages()[2:] for p in stage.parameters()]
        assert frozen and not any(p.requires_grad for p in frozen), "a frozen stage thawed"
        assert all(p.requires_grad for p in trainable)
        assert not any(m.training for m in model.stages()[:2]) and model.stage2.training
    model.stage1.requires_grad_(True)  # thawed by hand: the next train() freezes it again, as mmpretrain's
    model.train()
    assert not any(p.requires_grad for p in model.stage1.parameters())


def test_a_converted_block_that_was_frozen_stays_frozen() -> None:
    block = repvgg.RepVGGBlock(8, 8, 3, padding=1).eval()
    block.requires_grad_(False)
    block.reparameterize()
    assert not block.rbr_reparam.weight.requires_grad and not block.rbr_reparam.bias.requires_grad
    trained = repvgg.RepVGGBlock(8, 8, 3, padding=1).eval()
    trained.reparameterize()
    assert trained.rbr_reparam.weight.requires_grad


@pytest.mark.parametrize("deploy", [False, True], ids=["train_form", "deploy_form"])
@pytest.mark.parametrize("kind", ["classifier", "backbone", "pspnet"])
def test_fx_feature_extraction_then_torch_jit_script(kind: str, deploy: bool) -> None:
    """timm's and torchvision's ``create_feature_extractor`` route, then ``torch.jit.script`` (postponed
    annotations in the model modules once made fx write an unknown type ``_Tensor_``)."""
    import warnings

    from torchvision.models.feature_extraction import create_feature_extractor

    if kind == "pspnet":
        model: nn.Module = repvgg.pspnet("repvgg_a0", 5, aux_weight=0)
        nodes = {"backbone.stage3": "s3", "head": "out"}
    else:
        model = repvgg.create_model("repvgg_a0", num_classes=10, features_only=kind == "backbone")
        nodes = {"stage3": "s3", "stage4": "s4"}
    model = repvgg.randomize_batchnorm_(model, seed=2).eval()
    if deploy:
        model = repvgg.reparameterize(model)
    extractor = create_feature_extractor(model, return_nodes=nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still used
        scripted = torch.jit.script(extractor)
    inputs = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        expected, got = extractor(inputs), scripted(inputs)
    assert set(got) == set(nodes.values())
    assert all(torch.equal(expected[k], got[k]) for k in expected)
