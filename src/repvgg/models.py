"""RepVGG model definitions and the registry of the paper's variants.

A model is five stages of :class:`~repvgg.blocks.RepVGGBlock` (``stage0`` ... ``stage4``), global average
pooling (``gap``) and a fully connected head (``linear``): the authors' module names, so their
checkpoints and code port unchanged. Every named model is one configuration of :class:`RepVGG`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from repvgg.blocks import RepVGGBlock, block_design
from repvgg.exceptions import ModelConfigError
from repvgg.fusion import ConvBN

DEFAULT_STRIDES = (2, 2, 2, 2, 2)
LAYOUTS = ("repvgg", "residual_reorg")
#: 3x3 layers, numbered globally from the stem (layer 0), that the g2/g4 variants make grouped.
GROUPED_LAYERS = tuple(range(2, 27, 2))


class RepVGG(nn.Module):
    """A RepVGG network; accepts the authors' constructor arguments in their order.

    Args:
        num_blocks: blocks in stages 1-4, e.g. ``[2, 4, 14, 1]`` (stage 0 is one block).
        num_classes: classifier outputs; 0 builds no classifier (``forward`` returns pooled features).
        width_multiplier: ``[a, a, a, b]``; stage widths are ``int(64a), int(128a), int(256a),
            int(512b)`` and stage 0 is ``min(64, int(64a))``.
        override_groups_map: ``{layer_index: groups}`` with 3x3 layers numbered globally from 0 (stem).
        deploy: build the plain, already re-parameterized form.
        use_se: squeeze-and-excitation in every block (D2se).
        use_checkpoint: gradient checkpointing per block while training (saves memory, costs time).
        in_chans: input channels (1 for grey images).
        strides: the stride of the first block of stages 0-4; ``(2, 2, 2, 2, 2)`` is the paper's total
            stride 32. Small images (28-32 px) keep more resolution with e.g. ``(1, 1, 2, 2, 2)``.
        block: the training-time block design, a key of :data:`repvgg.blocks.BLOCK_DESIGNS` (e.g.
            ``"qarepvgg"`` or a Table 6/7 ablation); every design deploys to the same plain network.
        layout: ``"repvgg"``, or ``"residual_reorg"``: the paper's ResNet-like baseline (Table 7), with
            each stage's 3x3 layers paired into torchvision ``BasicBlock`` residual blocks (a stage of 2n
            layers has n blocks; a stage of one layer stays one conv-BN-ReLU). It has no plain form.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 1000,
        width_multiplier: Sequence[float] | None = None,
        override_groups_map: Mapping[int, int] | None = None,
        deploy: bool = False,
        use_se: bool = False,
        use_checkpoint: bool = False,
        *,
        in_chans: int = 3,
        strides: Sequence[int] = DEFAULT_STRIDES,
        block: str = "repvgg",
        layout: str = "repvgg",
        output_stride: int | None = None,
        dilation_mode: str = "full",
    ) -> None:
        super().__init__()
        block_design(block)  # an unknown design fails here, before any layer is built
        if layout not in LAYOUTS:
            raise ModelConfigError(f"Unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}.")
        if layout == "residual_reorg" and (deploy or use_se or override_groups_map or block != "repvgg"):
            raise ModelConfigError(
                "The residual_reorg layout is a ResNet-like baseline of plain conv-BN layers: it has no "
                "deploy form, no SE, no grouped layers and no block designs; build it from an A or "
                "ungrouped B model with the defaults."
            )
        if width_multiplier is None or len(width_multiplier) != 4 or len(num_blocks) != 4:
            raise ModelConfigError(
                "RepVGG needs four block counts (stages 1-4) and four width multipliers [a, a, a, b]."
            )
        if len(strides) != 5 or any(s not in (1, 2) for s in strides):
            raise ModelConfigError(
                f"strides must give 1 or 2 for each of the five stages, got {tuple(strides)}."
            )
        self.num_blocks = tuple(int(n) for n in num_blocks)
        self.width_multiplier = tuple(float(w) for w in width_multiplier)
        self.override_groups_map = {int(k): int(v) for k, v in (override_groups_map or {}).items()}
        self.deploy = deploy
        self.use_se = use_se
        self.use_checkpoint = use_checkpoint
        self.in_chans = in_chans
        self.strides = tuple(int(s) for s in strides)
        self.output_stride = output_stride
        self.dilation_mode = dilation_mode
        stage_strides, stage_dilations = dilated_strides(self.strides, output_stride, dilation_mode)
        self.block = block
        self.layout = layout
        self.model_name: str | None = None
        self.class_names: list[str] | None = None
        # How images were prepared in training (``repvgg.data.Preprocessing.as_dict()``), saved with it.
        self.preprocessing: dict[str, Any] | None = None

        widths = stage_widths(self.width_multiplier)
        self._layer_index = 0
        depths = (1, *self.num_blocks)
        dilations = [stage_dilations[i](depths[i]) for i in range(5)]
        self.stage0 = self._make_block(in_chans, widths[0], stage_strides[0])
        self.stage1 = self._make_stage(widths[0], widths[1], stage_strides[1], dilations[1])
        self.stage2 = self._make_stage(widths[1], widths[2], stage_strides[2], dilations[2])
        self.stage3 = self._make_stage(widths[2], widths[3], stage_strides[3], dilations[3])
        self.stage4 = self._make_stage(widths[3], widths[4], stage_strides[4], dilations[4])
        del self._layer_index
        self.num_features = widths[4]
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.num_classes = num_classes
        self.linear: nn.Module = self._make_head(num_classes)

    def _make_block(self, in_planes: int, planes: int, stride: int, dilation: int = 1) -> nn.Module:
        """The next 3x3 layer; its groups come from ``override_groups_map`` by global layer index."""
        if self.layout == "residual_reorg":
            return _conv_bn_relu(in_planes, planes, stride)
        block = RepVGGBlock(
            in_planes,
            planes,
            kernel_size=3,
            stride=stride,
            dilation=dilation,
            groups=self.override_groups_map.get(self._layer_index, 1),
            deploy=self.deploy,
            use_se=self.use_se,
            block=self.block,
        )
        self._layer_index += 1
        return block

    def _make_stage(self, in_planes: int, planes: int, stride: int, dilations: list[int]) -> nn.Sequential:
        depth = len(dilations)
        if self.layout == "residual_reorg":
            return _residual_stage(in_planes, planes, depth, stride)
        strides = [stride] + [1] * (depth - 1)
        return nn.Sequential(
            *(
                self._make_block(in_planes if i == 0 else planes, planes, s, d)
                for i, (s, d) in enumerate(zip(strides, dilations, strict=True))
            )
        )

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this architecture (not its form or weights)."""
        return {
            "num_blocks": list(self.num_blocks),
            "width_multiplier": list(self.width_multiplier),
            "override_groups_map": dict(self.override_groups_map),
            "use_se": self.use_se,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "strides": list(self.strides),
            "block": self.block,
            "layout": self.layout,
            "output_stride": self.output_stride,
            "dilation_mode": self.dilation_mode,
        }

    def stages(self) -> list[nn.Module]:
        return [self.stage0, self.stage1, self.stage2, self.stage3, self.stage4]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_checkpoint = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a new one for ``num_classes`` (0 removes it)."""
        reference = next(self.parameters())
        self.num_classes = num_classes
        self.linear = self._make_head(num_classes).to(reference.device, reference.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        checkpointing = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for stage in self.stages():
            # Stage 0 is a single block, as in the authors' code (keys ``stage0.rbr_dense...``).
            for block in stage if isinstance(stage, nn.Sequential) else (stage,):
                if checkpointing:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.gap(x), 1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


FAST_DILATED_LAYERS = 5  # the paper's "-fast" PSPNet backbones dilate only the network's last 5 layers


def dilated_strides(
    strides: Sequence[int], output_stride: int | None, mode: str = "full"
) -> tuple[list[int], list[Callable[[int], list[int]]]]:
    """Per-stage strides and, per stage, a function from its depth to its layers' dilations.

    Strides of 2 are turned into 1, last stage first, until the total stride is ``output_stride``; every
    later layer is dilated by the stride given up so far (2, then 4). With ``mode="fast"`` only the last
    :data:`FAST_DILATED_LAYERS` layers of the network are dilated, the others keep dilation 1.
    """
    if mode not in ("full", "fast"):
        raise ModelConfigError(f"dilation_mode must be 'full' or 'fast', got {mode!r}.")
    new_strides = list(strides)
    total = math.prod(new_strides)
    if output_stride is not None:
        if output_stride not in (8, 16, 32) or output_stride > total:
            raise ModelConfigError(
                f"output_stride must be 8, 16 or 32 and at most the model's total stride {total}; "
                f"got {output_stride}."
            )
        for stage in range(4, 0, -1):
            if total > output_stride and new_strides[stage] == 2:
                new_strides[stage], total = 1, total // 2
    rates, running = [], 1
    for before, after in zip(strides, new_strides, strict=True):
        running *= before // after
        rates.append(running)

    def layers(stage: int) -> Callable[[int], list[int]]:
        def dilations(depth: int) -> list[int]:
            rate = rates[stage]
            if mode == "full" or rate == 1:
                return [rate] * depth
            later = sum(1 for s in range(stage + 1, 5) if rates[s] > 1)  # dilated layers after this stage
            keep = max(0, FAST_DILATED_LAYERS - later)  # stage 4 is one layer in every registered model
            return [1] * max(0, depth - keep) + [rate] * min(depth, keep)

        return dilations

    return new_strides, [layers(stage) for stage in range(5)]


def _conv_bn_relu(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ConvBN(in_planes, planes, 3, stride=stride, padding=1), nn.ReLU(inplace=True))


def _residual_stage(in_planes: int, planes: int, depth: int, stride: int) -> nn.Sequential:
    """``depth`` 3x3 layers as residual pairs (torchvision's BasicBlock, 1x1 projection shortcut where the
    shape changes); an odd layer out comes first as a plain conv-BN-ReLU carrying the stride."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = []
    if depth % 2:
        layers.append(_conv_bn_relu(in_planes, planes, stride))
        in_planes, stride = planes, 1
    for _ in range(depth // 2):
        shortcut = None
        if stride != 1 or in_planes != planes:
            shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers.append(BasicBlock(in_planes, planes, stride=stride, downsample=shortcut))
        in_planes, stride = planes, 1
    return nn.Sequential(*layers)


def stage_widths(width_multiplier: Sequence[float]) -> tuple[int, int, int, int, int]:
    """Output channels of stages 0-4 for ``width_multiplier = [a, a, a, b]``."""
    a1, a2, a3, b = width_multiplier
    return (min(64, int(64 * a1)), int(64 * a1), int(128 * a2), int(256 * a3), int(512 * b))


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its RepVGG configuration and the top-1 the paper reports for it."""

    num_blocks: tuple[int, int, int, int]
    width_multiplier: tuple[float, float, float, float]
    groups: int = 1
    use_se: bool = False
    paper_top1: float | None = None
    top1_source: str = ""
    paper_params_m: float | None = None  # deploy-form parameters in millions, paper Table 4
    paper_speed: float | None = None  # examples/s of the deploy form on a GTX 1080Ti, batch 128 (Tables 4-5)
    override_groups_map: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        groups_map = {layer: self.groups for layer in GROUPED_LAYERS} if self.groups > 1 else {}
        object.__setattr__(self, "override_groups_map", groups_map)

    def constructor_kwargs(self) -> dict[str, Any]:
        return {
            "num_blocks": list(self.num_blocks),
            "width_multiplier": list(self.width_multiplier),
            "override_groups_map": dict(self.override_groups_map),
            "use_se": self.use_se,
        }


TABLE4 = "Table 4 (120 epochs, simple augmentation)"
TABLE5 = "Table 5 (200 epochs, AutoAugment + label smoothing + mixup)"
_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)

MODEL_SPECS: dict[str, ModelSpec] = {
    "repvgg_a0": ModelSpec(
        _A,
        (0.75, 0.75, 0.75, 2.5),
        paper_top1=72.41,
        top1_source=TABLE4,
        paper_params_m=8.3,
        paper_speed=3256,
    ),
    "repvgg_a1": ModelSpec(
        _A, (1, 1, 1, 2.5), paper_top1=74.46, top1_source=TABLE4, paper_params_m=12.78, paper_speed=2339
    ),
    "repvgg_a2": ModelSpec(
        _A,
        (1.5, 1.5, 1.5, 2.75),
        paper_top1=76.48,
        top1_source=TABLE4,
        paper_params_m=25.49,
        paper_speed=1322,
    ),
    "repvgg_b0": ModelSpec(
        _B, (1, 1, 1, 2.5), paper_top1=75.14, top1_source=TABLE4, paper_params_m=14.33, paper_speed=1817
    ),
    "repvgg_b1": ModelSpec(
        _B, (2, 2, 2, 4), paper_top1=78.37, top1_source=TABLE4, paper_params_m=51.82, paper_speed=685
    ),
    "repvgg_b1g2": ModelSpec(
        _B, (2, 2, 2, 4), 2, paper_top1=77.78, top1_source=TABLE4, paper_params_m=41.36, paper_speed=792
    ),
    "repvgg_b1g4": ModelSpec(
        _B, (2, 2, 2, 4), 4, paper_top1=77.58, top1_source=TABLE4, paper_params_m=36.12, paper_speed=868
    ),
    "repvgg_b2": ModelSpec(
        _B, (2.5, 2.5, 2.5, 5), paper_top1=78.78, top1_source=TABLE4, paper_params_m=80.31, paper_speed=460
    ),
    "repvgg_b2g2": ModelSpec(_B, (2.5, 2.5, 2.5, 5), 2),
    "repvgg_b2g4": ModelSpec(
        _B, (2.5, 2.5, 2.5, 5), 4, paper_top1=78.50, top1_source=TABLE4, paper_params_m=55.77, paper_speed=581
    ),
    "repvgg_b3": ModelSpec(_B, (3, 3, 3, 5), paper_top1=80.52, top1_source=TABLE5, paper_speed=363),
    "repvgg_b3g2": ModelSpec(_B, (3, 3, 3, 5), 2),
    "repvgg_b3g4": ModelSpec(_B, (3, 3, 3, 5), 4, paper_top1=80.21, top1_source=TABLE5, paper_speed=464),
    "repvgg_d2se": ModelSpec(
        (8, 14, 24, 1),
        (2.5, 2.5, 2.5, 5),
        use_se=True,
        paper_top1=81.82,
        top1_source="authors' README (200 epochs, tested at 224 px)",
    ),
}


def list_models() -> list[str]:
    """Names of every registered model, in the paper's order."""
    return list(MODEL_SPECS)


def canonical_name(name: str) -> str:
    """``"RepVGG-B1g2"``, ``"b1g2"`` and ``"repvgg_b1g2"`` all name ``repvgg_b1g2``."""
    key = name.strip().lower().replace("-", "_")
    if not key.startswith("repvgg_"):
        key = "repvgg_" + key
    if key not in MODEL_SPECS:
        close = difflib.get_close_matches(key, MODEL_SPECS, n=1)
        hint = f"did you mean {close[0]}?" if close else "see repvgg.list_models()."
        raise ModelConfigError(f"Unknown model {name!r}: {hint}")
    return key


def create_model(
    name: str,
    num_classes: int = 1000,
    deploy: bool = False,
    in_chans: int = 3,
    features_only: bool = False,
    **options: Any,
) -> RepVGG:
    """Build a named model, in training form or (``deploy=True``) directly in its plain form.

    ``options`` are the other keyword arguments of :class:`RepVGG`: ``strides``, ``use_checkpoint``,
    ``block`` (e.g. ``create_model("a0", block="qarepvgg")``), ``layout`` (``"residual_reorg"``),
    ``output_stride`` and ``dilation_mode``. ``features_only=True`` builds the headless
    :class:`repvgg.backbone.RepVGGFeatures` (options ``out_indices``, ``frozen_stages``, ``norm_eval``).
    """
    key = canonical_name(name)
    architecture: type[RepVGG] = RepVGG
    if features_only:
        from repvgg.backbone import RepVGGFeatures

        architecture = RepVGGFeatures
    elif {"out_indices", "frozen_stages", "norm_eval"} & set(options):
        raise ModelConfigError(
            "out_indices, frozen_stages and norm_eval are backbone options: add features_only=True."
        )
    model = architecture(
        **MODEL_SPECS[key].constructor_kwargs(),
        num_classes=num_classes,
        deploy=deploy,
        in_chans=in_chans,
        **options,
    )
    model.model_name = key
    return model


def name_for_config(config: Mapping[str, Any]) -> str | None:
    """The registered name whose architecture equals ``config`` (see :attr:`RepVGG.config`), if any."""
    for name, spec in MODEL_SPECS.items():
        kwargs = spec.constructor_kwargs()
        if all(_same(config.get(k), v) for k, v in kwargs.items()):
            return name
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, dict):
        return isinstance(a, Mapping) and {int(k): int(v) for k, v in a.items()} == b
    if isinstance(b, list):
        return a is not None and [float(x) for x in a] == [float(x) for x in b]
    return a == b
