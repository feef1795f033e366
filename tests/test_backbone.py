"""RepVGG as a backbone: features, dilation, freezing, checkpoints, PSPNet and a torchvision detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import repvgg
from repvgg.core.backbone import RepVGGFeatures
from repvgg.exceptions import ModelConfigError, RepVGGWarning
from repvgg.studies.segmentation import class_iou, confusion_matrix, evaluate_forms, mean_iou, pspnet
from tests.helpers import relative_error

SMALL = {"num_blocks": [1, 1, 6, 1], "width_multiplier": [0.25, 0.25, 0.25, 0.5]}


@pytest.mark.parametrize(
    ("output_stride", "reductions"), [(None, [4, 8, 16, 32]), (16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])]
)
def test_features_come_out_at_the_stated_reductions(output_stride: int | None, reductions: list[int]) -> None:
    backbone = repvgg.create_model("repvgg_a0", features_only=True, output_stride=output_stride)
    assert [info["reduction"] for info in backbone.feature_info] == reductions
    assert [info["num_chs"] for info in backbone.feature_info] == [48, 96, 192, 1280]
    features = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [48, 96, 192, 1280]
    assert [64 // f.shape[-1] for f in features] == reductions


def test_full_and_fast_dilation_follow_the_paper() -> None:
    def rates(mode: str) -> list[int]:
        model = repvgg.create_model("repvgg_b1g2", features_only=True, output_stride=8, dilation_mode=mode)
        return [b.dilation for b in model.modules() if isinstance(b, repvgg.RepVGGBlock)]

    full, fast = rates("full"), rates("fast")
    # B1g2: stages of 1, 4, 6, 16, 1 layers; full dilates all of stages 3 and 4 (2 and 4)
    assert full == [1] * 11 + [2] * 16 + [4]
    assert fast == [1] * 11 + [1] * 12 + [2] * 4 + [4], "fast: only the last 5 layers"
    with pytest.raises(ModelConfigError, match="output_stride must be 8, 16 or 32"):
        repvgg.create_model("repvgg_a0", output_stride=4)
    with pytest.raises(ModelConfigError, match="dilation_mode must be"):
        repvgg.create_model("repvgg_a0", output_stride=8, dilation_mode="slow")


def test_dilated_backbone_converts_exactly() -> None:
    backbone = repvgg.RepVGG(**SMALL, num_classes=0, output_stride=8, dilation_mode="fast")
    repvgg.randomize_batchnorm_(backbone, seed=3)
    report = repvgg.verify_equivalence(backbone, input_shape=(1, 3, 64, 48))
    assert report.passed and report.max_rel_error <= 1e-10


def test_frozen_stages_and_norm_eval() -> None:
    backbone = repvgg.create_model("repvgg_a0", features_only=True, frozen_stages=1, norm_eval=True).train()
    assert not any(p.requires_grad for p in backbone.stage1.parameters())
    assert all(p.requires_grad for p in backbone.stage2.parameters())
    assert not backbone.stage0.training and not backbone.stage1.training and backbone.stage2.training
    assert not any(m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ModelConfigError, match="add features_only=True"):
        repvgg.create_model("repvgg_a0", out_indices=(1, 2))
    with pytest.raises(ModelConfigError, match="out_indices must name stages 0-4"):
        repvgg.create_model("repvgg_a0", features_only=True, out_indices=(5,))


def test_a_classification_checkpoint_loads_into_a_backbone_with_a_note(tmp_path: Path) -> None:
    classifier = repvgg.create_model("repvgg_a0", num_classes=10)
    path = repvgg.save_checkpoint(classifier, tmp_path / "a0.safetensors")
    backbone = repvgg.create_model("repvgg_a0", features_only=True, out_indices=(4,))
    with pytest.warns(RepVGGWarning, match=r"classifier head \(linear.bias, linear.weight\) was dropped"):
        repvgg.load_checkpoint(path, backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x)[0], classifier.eval().forward_features(x))


def test_pspnet_trains_with_an_aux_head_and_converts_with_identical_miou() -> None:
    model = pspnet("repvgg_a0", num_classes=5, head_channels=32)
    assert isinstance(model.backbone, RepVGGFeatures)
    images = torch.randn(2, 3, 48, 40)
    logits, aux = model.train()(images)
    assert logits.shape == aux.shape == (2, 5, 48, 40)
    model = repvgg.randomize_batchnorm_(model.double(), seed=5).eval()
    x = images.double()
    with torch.no_grad():
        expected = model(x)
        deployed = repvgg.reparameterize(model)
        actual = deployed(x)
    assert relative_error(actual, expected) <= 1e-10
    target = torch.randint(0, 5, (2, 48, 40))
    before = mean_iou(confusion_matrix(expected.argmax(1), target, 5))
    after = mean_iou(confusion_matrix(actual.argmax(1), target, 5))
    assert before == after


def test_mean_iou_of_known_masks() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 1]])
    # class 0: 1 / 2, class 1: 2 / 3, class 2: 2 / 2; the 255 pixels are ignored
    assert mean_iou(confusion_matrix(prediction, target, 3)) == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert class_iou(confusion_matrix(prediction, target, 4)) == pytest.approx([50, 100 * 2 / 3, 100, None])


def test_evaluate_forms_scores_each_model_and_counts_the_pixels_they_disagree_on() -> None:
    class Fixed(nn.Module):
        def __init__(self, labels: torch.Tensor) -> None:
            super().__init__()
            self.logits = nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.logits

    masks = torch.tensor([[[0, 1], [1, 1]]])
    loader = [(torch.zeros(1, 1, 2, 2), masks)]
    right, one_off = Fixed(masks), Fixed(torch.tensor([[[0, 1], [1, 0]]]))
    metrics, disagreeing = evaluate_forms({"a": right, "b": one_off, "c": right}, loader, 2)  # type: ignore[arg-type]
    assert disagreeing == 1
    assert metrics["a"]["miou"] == 100 and metrics["c"] == metrics["a"]
    assert metrics["b"]["pixel_accuracy"] == 75 and metrics["b"]["class_iou"] == pytest.approx([50, 200 / 3])


@pytest.mark.slow
def test_backbone_under_torchvision_fpn_in_faster_rcnn_converts_exactly() -> None:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    body = repvgg.RepVGG(**SMALL, num_classes=0)
    widths = [16, 32, 64, 256]
    backbone = BackboneWithFPN(
        body, {"stage1": "0", "stage2": "1", "stage3": "2", "stage4": "3"}, widths, out_channels=32
    )
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128)
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 96)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 20.0, 50.0, 90.0]]), "labels": torch.tensor([2])},
    ]
    losses = detector.train()(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
    sum(losses.values()).backward()
    repvgg.randomize_batchnorm_(detector, seed=7)
    detector.eval()
    report = repvgg.verify_equivalence(detector.backbone, input_shape=(1, 3, 128, 96))
    assert report.passed, str(report)
    deployed = repvgg.reparameterize(detector)
    assert repvgg.is_deployed(deployed)
    with torch.no_grad():
        before, after = detector(images), deployed(images)
    for b, a in zip(before, after, strict=True):
        assert b["boxes"].shape == a["boxes"].shape
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-3, atol=1e-2)


@pytest.mark.slow
def test_the_detection_example_runs() -> None:
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "faster_rcnn_backbone.py"
    result = subprocess.run(
        [sys.executable, str(example), "--size", "128"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "training losses:" in result.stdout and ": ok at tolerance" in result.stdout
