"""Whole-network re-parameterization: exact for every model, and for networks that contain RepVGG."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import repvgg
from repvgg import ConversionError, RepVGGBlock, RepVGGWarning, SEBlock
from repvgg.core.designs import BLOCK_DESIGNS
from repvgg.core.reparam import TOLERANCE
from tests.helpers import relative_error, trained_looking

BIG = {"repvgg_b2", "repvgg_b3", "repvgg_b3g2", "repvgg_d2se"}


def body_kinds(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if not list(m.children())}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in repvgg.list_models()],
)
def test_every_model_converts_exactly_in_float64(name: str) -> None:
    model = trained_looking(name, num_classes=10).double()
    x = torch.randn(2, 3, 72, 40, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        deployed = repvgg.reparameterize(model)
        actual = deployed(x)
    assert relative_error(actual, expected) <= 1e-10
    leaves = body_kinds(deployed)
    allowed = {nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Linear, nn.Identity}
    assert leaves <= allowed, leaves - allowed
    for block in (m for m in deployed.modules() if isinstance(m, RepVGGBlock)):
        conv = block.rbr_reparam
        assert conv.kernel_size == (3, 3) and conv.bias is not None
        assert isinstance(block.se, SEBlock if name == "repvgg_d2se" else nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert repvgg.is_deployed(deployed) and deployed.deploy
    assert not repvgg.is_deployed(model), "the original must stay untouched"


@pytest.mark.parametrize("block", [name for name, design in BLOCK_DESIGNS.items() if design.convertible])
def test_every_block_design_converts_a0_exactly_to_the_same_plain_network(block: str) -> None:
    model = trained_looking("repvgg_a0", num_classes=10, block=block).double()
    report = repvgg.verify_equivalence(model, input_shape=(2, 3, 64, 48))
    assert report.passed and report.max_rel_error <= 1e-10, str(report)
    plain = repvgg.create_model("repvgg_a0", num_classes=10, deploy=True)
    converted = repvgg.reparameterize(model)
    assert {k: v.shape for k, v in converted.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }


def test_verify_equivalence_reports_float64_exactness() -> None:
    model = trained_looking("repvgg_a1")
    report = repvgg.verify_equivalence(model)
    assert report.passed and report.max_rel_error < 1e-12
    assert report.input_shape == (2, 3, 64, 48)
    assert "ok at tolerance 1e-10" in str(report)
    float32 = repvgg.verify_equivalence(model, repvgg.reparameterize(model))
    assert (
        float32.passed
        and float32.tolerance == TOLERANCE[torch.float32]
        and 1e-12 < float32.max_rel_error < 1e-5
    )


def test_verify_equivalence_catches_a_wrong_conversion() -> None:
    model = trained_looking("repvgg_a0")
    deployed = repvgg.reparameterize(model)
    with torch.no_grad():
        deployed.stage2[1].rbr_reparam.bias.add_(0.01)
    assert not repvgg.verify_equivalence(model, deployed).passed
    other = trained_looking("repvgg_a0", num_classes=3)
    with pytest.raises(ConversionError, match="different shapes"):
        repvgg.verify_equivalence(model, repvgg.reparameterize(other))


class TinySegmenter(nn.Module):
    """A larger network with RepVGG blocks inside: a backbone plus a decoder with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = repvgg.create_model("repvgg_a0", num_classes=0)
        self.neck = nn.ModuleDict({"extra": RepVGGBlock(1280, 1280)})
        self.decoder = nn.Sequential(nn.Conv2d(1280, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.neck["extra"](self.backbone.forward_features(x))
        return {"out": self.decoder(features), "features": features}


def test_any_module_containing_blocks_converts_and_original_is_untouched() -> None:
    model = repvgg.randomize_batchnorm_(TinySegmenter(), seed=4).double().eval()
    x = torch.randn(1, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        converted = repvgg.reparameterize(model)
        actual = converted(x)
    for key in expected:
        assert relative_error(actual[key], expected[key]) <= 1e-10
    assert repvgg.is_deployed(converted) and not repvgg.is_deployed(model)
    assert isinstance(converted.decoder[1], nn.BatchNorm2d), "non-RepVGG layers are left alone"
    assert repvgg.verify_equivalence(model).passed


def test_inplace_conversion_returns_the_same_object() -> None:
    model = trained_looking("repvgg_a0")
    assert repvgg.reparameterize(model, inplace=True) is model
    assert repvgg.is_deployed(model)
    assert repvgg.reparameterize(model) is not model  # already deployed: a copy, unchanged


def test_train_mode_conversion_uses_running_statistics_and_warns_once() -> None:
    model = trained_looking("repvgg_a0").train()
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(RepVGGWarning) as caught:
        deployed = repvgg.reparameterize(model)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "running statistics" in message and message.count(". ") == 0 and message.endswith(".")
    with torch.no_grad():
        assert relative_error(deployed.eval()(x), model.eval()(x)) < 1e-5


def test_eval_mode_conversion_does_not_warn() -> None:
    model = trained_looking("repvgg_a0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repvgg.reparameterize(model)


def test_module_without_blocks_is_refused() -> None:
    with pytest.raises(ConversionError, match="contains no RepVGG blocks"):
        repvgg.reparameterize(nn.Sequential(nn.Conv2d(3, 3, 3)))


def test_authors_conversion_entry_point(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = trained_looking("repvgg_a0", num_classes=10)
    path = tmp_path / "deploy.safetensors"
    deployed = repvgg.repvgg_model_convert(model, save_path=str(path))
    assert repvgg.is_deployed(deployed) and not repvgg.is_deployed(model)
    assert repvgg.load_checkpoint(path).deploy
