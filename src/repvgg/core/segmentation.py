"""PSPNet over a RepVGG backbone: the segmentation network of the paper's Cityscapes experiment (Table 8).

Pure ``nn`` code like the rest of ``core``: it carries its model-info record (the backbone's architecture
and the head's settings), so a saved PSPNet rebuilds itself and goes through ``eval``, ``export`` and
``predict`` like a classifier. Training it is :mod:`repvgg.studies.segmentation`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repvgg.core.backbone import RepVGGFeatures
from repvgg.core.blocks import form_of
from repvgg.core.fusion import conv_bn_relu
from repvgg.core.info import ModelInfo, Preprocessing
from repvgg.core.registry import create_model
from repvgg.exceptions import ModelConfigError


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: the input, plus its average pools at each bin size reduced to
    ``channels // len(bins)`` channels and upsampled back, concatenated."""

    def __init__(self, channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduced = channels // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), conv_bn_relu(channels, reduced, 1)) for size in bins
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
        self.head_channels, self.dropout = head_channels, dropout
        # The record's labels, as a RepVGG's (see :attr:`info`).
        self.class_names: list[str] | None = None
        self.preprocessing: Preprocessing | None = None
        stage3, stage4 = (info["num_chs"] for info in backbone.feature_info)
        self.ppm = PyramidPooling(stage4)
        self.head = nn.Sequential(
            conv_bn_relu(self.ppm.out_channels, head_channels, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(head_channels, num_classes, 1),
        )
        self.aux_head = (
            nn.Sequential(
                conv_bn_relu(stage3, head_channels // 2, 3),
                nn.Dropout2d(dropout),
                nn.Conv2d(head_channels // 2, num_classes, 1),
            )
            if aux_weight > 0
            else None
        )

    @property
    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this architecture: the head's settings and the backbone's config."""
        return {
            "num_classes": self.num_classes,
            "in_chans": self.backbone.in_chans,
            "head_channels": self.head_channels,
            "aux_weight": self.aux_weight,
            "dropout": self.dropout,
            "backbone": self.backbone.config,
        }

    @property
    def info(self) -> ModelInfo:
        """The model-info record (saved in checkpoints); the form is the backbone's."""
        name = self.backbone.model_name
        return ModelInfo(
            model_name=f"pspnet_{name}" if name else None,
            config=self.config,
            class_names=tuple(self.class_names) if self.class_names is not None else None,
            preprocessing=self.preprocessing,
            form=form_of(self),
            module_type=type(self).__name__,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, deploy: bool = False) -> "PSPNet":
        """The untrained network of a :attr:`config` record, in training or (``deploy``) plain form."""
        backbone_config = {k: v for k, v in config["backbone"].items() if k != "num_classes"}
        backbone = RepVGGFeatures(**backbone_config, out_indices=(3, 4), deploy=deploy)
        options = {k: config[k] for k in ("head_channels", "aux_weight", "dropout")}
        return cls(backbone, int(config["num_classes"]), **options)

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
