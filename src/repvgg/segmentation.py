"""PSPNet over a RepVGG backbone (the paper's Table 8), and the mean IoU it is judged by.

The backbone is a :class:`~repvgg.backbone.RepVGGFeatures` with output stride 8 (dilated last stages);
the pyramid pooling module pools its last feature map into 1x1, 2x2, 3x3 and 6x6 bins, and an optional
auxiliary head on stage 3 adds a second loss while training. :func:`repvgg.reparameterize` converts the
whole segmenter in one call: only the backbone's blocks change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repvgg.backbone import RepVGGFeatures
from repvgg.exceptions import ModelConfigError
from repvgg.models import create_model


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: the input, plus its average pools at each bin size reduced to
    ``channels // len(bins)`` channels and upsampled back, concatenated."""

    def __init__(self, channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduced = channels // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), _conv_bn_relu(channels, reduced, 1)) for size in bins
        )
        self.out_channels = channels + reduced * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(x), size, mode="bilinear", align_corners=False) for stage in self.stages
        ]
        return torch.cat([x, *pooled], dim=1)


class PSPNet(nn.Module):
    """PSPNet: ``backbone`` features -> pyramid pooling -> 3x3 conv -> classifier, upsampled to the input.

    In training mode with ``aux_weight > 0`` the forward pass returns ``(logits, aux_logits)``; in eval
    mode the logits alone. ``backbone`` must return stage 3 and stage 4 features (``out_indices=(3, 4)``).
    """

    def __init__(
        self,
        backbone: RepVGGFeatures,
        num_classes: int,
        *,
        head_channels: int = 256,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if backbone.out_indices != (3, 4):
            raise ModelConfigError(
                "PSPNet needs the backbone's stage 3 and stage 4 outputs: out_indices=(3, 4)."
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        stage3, stage4 = (info["num_chs"] for info in backbone.feature_info)
        self.ppm = PyramidPooling(stage4)
        self.head = nn.Sequential(
            _conv_bn_relu(self.ppm.out_channels, head_channels, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(head_channels, num_classes, 1),
        )
        self.aux_head = (
            nn.Sequential(
                _conv_bn_relu(stage3, head_channels // 2, 3),
                nn.Dropout2d(dropout),
                nn.Conv2d(head_channels // 2, num_classes, 1),
            )
            if aux_weight > 0
            else None
        )

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        size = images.shape[-2:]
        stage3, stage4 = self.backbone(images)
        logits = F.interpolate(self.head(self.ppm(stage4)), size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            aux = F.interpolate(self.aux_head(stage3), size, mode="bilinear", align_corners=False)
            return logits, aux
        return logits


def pspnet(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    output_stride: int = 8,
    dilation_mode: str = "full",
    **options: object,
) -> PSPNet:
    """A PSPNet over the named RepVGG (e.g. ``"repvgg_b1g2"``, dilation_mode ``"fast"`` for the paper's
    "-fast" variants). ``options`` go to :class:`PSPNet` (head_channels, aux_weight, dropout)."""
    backbone = create_model(
        name,
        in_chans=in_chans,
        features_only=True,
        out_indices=(3, 4),
        output_stride=output_stride,
        dilation_mode=dilation_mode,
    )
    assert isinstance(backbone, RepVGGFeatures)
    return PSPNet(backbone, num_classes, **options)  # type: ignore[arg-type]


def confusion_matrix(
    predictions: Tensor, targets: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """Pixel counts per (true class, predicted class), ignoring pixels labelled ``ignore_index``."""
    keep = targets != ignore_index
    pairs = targets[keep].long() * num_classes + predictions[keep].long()
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> float:
    """Mean over the classes present (in truth or prediction) of intersection / union, in percent."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean() * 100) if present.any() else 0.0
