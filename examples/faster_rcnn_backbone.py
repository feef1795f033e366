"""RepVGG under torchvision's FPN in a Faster R-CNN: train step, inference, exact conversion.

Run: python examples/faster_rcnn_backbone.py [--model repvgg_a0] [--size 320]
"""

from __future__ import annotations

import argparse

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN

import repvgg


def build_detector(model: str, num_classes: int, size: int) -> FasterRCNN:
    body = repvgg.create_model(model, num_classes=0)  # headless: children stage0..stage4, gap, linear
    widths = [info["num_chs"] for info in repvgg.create_model(model, features_only=True).feature_info]
    return_layers = {f"stage{i}": str(i - 1) for i in (1, 2, 3, 4)}
    backbone = BackboneWithFPN(body, return_layers, widths, out_channels=128)
    return FasterRCNN(backbone, num_classes=num_classes, min_size=size, max_size=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    torch.manual_seed(0)
    detector = build_detector(args.model, num_classes=3, size=args.size)
    images = [torch.rand(3, args.size, args.size)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 160.0]]), "labels": torch.tensor([1])}]

    losses = detector.train()(images, targets)  # one training step's losses
    sum(losses.values()).backward()
    print("training losses:", {name: round(float(value), 3) for name, value in losses.items()})

    detector.eval()
    report = repvgg.verify_equivalence(detector.backbone, input_shape=(1, 3, args.size, args.size))
    print("backbone + FPN, converted vs multi-branch:", report)
    deployed = repvgg.reparameterize(detector)  # the whole detector; only RepVGG blocks change
    with torch.no_grad():
        before, after = detector(images)[0], deployed(images)[0]
    print(f"detections before / after conversion: {len(before['boxes'])} / {len(after['boxes'])}")


if __name__ == "__main__":
    main()
