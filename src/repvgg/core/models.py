"""RepVGG model definitions and the registry of the paper's variants.

A model is five stages of :class:`~repvgg.blocks.RepVGGBlock` (``stage0`` ... ``stage4``), global average
pooling (``gap``) and a fully connected head (``linear``): the authors' module names, so their
checkpoints and code port unchanged. Every named model is one configuration of :class:`RepVGG`.
"""

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from repvgg.core.arguments import probability, switch, whole_number
from repvgg.core.blocks import RepVGGBlock, form_of
from repvgg.core.designs import block_design
from repvgg.core.info import ModelInfo, Preprocessing
from repvgg.exceptions import ModelConfigError

DEFAULT_STRIDES = (2, 2, 2, 2, 2)


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
        output_stride, dilation_mode: dilate the last stages instead of striding them (8 or 16; ``"fast"``
            dilates only the last 5 layers, the paper's PSPNet "-fast" backbones).
        dilations: the dilation of every 3x3 layer of each of stages 0-4, as mmpretrain's ``dilations``
            (an alternative to ``output_stride``, which sets them from the strides given up).
        base_channels: the channels ``64`` of the width formula (mmpretrain's ``base_channels``): stage
            widths are ``int(base*a), int(2*base*a), int(4*base*a), int(8*base*b)``, and stage 0 is
            ``min(64, int(base*a))`` (at most 64 whatever the base, as mmpretrain builds its stem).
        se_reduction: the SE block's reduction, ``internal = out // se_reduction`` (the authors' 16).
        frozen_stages: stages 0..k are frozen while training (no gradients, BatchNorm statistics kept), as
            mmpretrain's ``frozen_stages``; -1 freezes none. Fine-tuning on few images often freezes 0-1.
        drop_path_rate: stochastic depth while training (timm's ``drop_path_rate``), rising linearly from 0
            at the first block to this rate at the last; it acts only in blocks with an identity branch and
            only in training mode, so the deploy form and the record do not depend on it.
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
        output_stride: int | None = None,
        dilation_mode: str = "full",
        dilations: Sequence[int] | None = None,
        base_channels: int = 64,
        se_reduction: int = 16,
        frozen_stages: int = -1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        whole_number(num_classes, "num_classes", 0)
        whole_number(in_chans, "in_chans", 1)
        for flag, given in (("deploy", deploy), ("use_se", use_se), ("use_checkpoint", use_checkpoint)):
            switch(given, flag)
        block_design(block)  # an unknown design fails here, before any layer is built
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
        layers = 1 + sum(self.num_blocks)
        beyond = sorted(k for k in self.override_groups_map if not 0 <= k < layers)
        if beyond:
            raise ModelConfigError(
                f"override_groups_map names layers {beyond}, but this network's 3x3 layers are numbered 0-"
                f"{layers - 1}; give layer indices that exist."
            )
        self._build_deployed = deploy
        self.use_se = use_se
        self.use_checkpoint = use_checkpoint
        self.in_chans = in_chans
        self.strides = tuple(int(s) for s in strides)
        self.output_stride = output_stride
        self.dilation_mode = dilation_mode
        if dilations is not None and (
            output_stride is not None or len(dilations) != 5 or any(int(d) < 1 for d in dilations)
        ):
            raise ModelConfigError(
                f"dilations must give a dilation of at least 1 for each of the five stages, without "
                f"output_stride (which sets them itself); got {dilations} and output_stride {output_stride}."
            )
        if base_channels < 1 or se_reduction < 1:
            raise ModelConfigError(
                f"base_channels and se_reduction must be at least 1, got {base_channels} and {se_reduction}."
            )
        self.drop_path_rate = probability(drop_path_rate, "drop_path_rate")
        self.dilations = tuple(int(d) for d in dilations) if dilations is not None else None
        self.base_channels, self.se_reduction = int(base_channels), int(se_reduction)
        stage_strides, stage_dilations = dilated_strides(self.strides, output_stride, dilation_mode)
        self.block = block
        # What the model's record holds besides its architecture and form (see :attr:`info`).
        self.model_name: str | None = None
        self.class_names: list[str] | None = None
        self.preprocessing: Preprocessing | None = None  # how images were prepared in training
        self.runtime: dict[str, str] | None = None  # the backend and precision `repvgg optimize` chose

        widths = stage_widths(self.width_multiplier, self.base_channels)
        self._layer_index, self._layers = 0, layers
        depths = (1, *self.num_blocks)
        if self.dilations is not None:
            dilations = [[self.dilations[i]] * depths[i] for i in range(5)]
        else:
            dilations = [stage_dilations[i](depths[i]) for i in range(5)]
        self.stage0 = self._make_block(in_chans, widths[0], stage_strides[0], dilations[0][0])
        self.stage1 = self._make_stage(widths[0], widths[1], stage_strides[1], dilations[1])
        self.stage2 = self._make_stage(widths[1], widths[2], stage_strides[2], dilations[2])
        self.stage3 = self._make_stage(widths[2], widths[3], stage_strides[3], dilations[3])
        self.stage4 = self._make_stage(widths[3], widths[4], stage_strides[4], dilations[4])
        del self._layer_index, self._layers
        self.num_features = widths[4]
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.num_classes = num_classes
        self.linear: nn.Module = self._make_head(num_classes)
        self.freeze_stages(frozen_stages)

    def _make_block(self, in_planes: int, planes: int, stride: int, dilation: int = 1) -> nn.Module:
        """The next 3x3 layer; its groups come from ``override_groups_map`` by global layer index."""
        block = RepVGGBlock(
            in_planes,
            planes,
            kernel_size=3,
            stride=stride,
            dilation=dilation,
            groups=self.override_groups_map.get(self._layer_index, 1),
            deploy=self._build_deployed,
            use_se=self.use_se,
            block=self.block,
            se_reduction=self.se_reduction,
            drop_path=self.drop_path_rate * self._layer_index / max(1, self._layers - 1),
        )
        self._layer_index += 1
        return block

    def _make_stage(self, in_planes: int, planes: int, stride: int, dilations: list[int]) -> nn.Sequential:
        depth = len(dilations)
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
            "output_stride": self.output_stride,
            "dilation_mode": self.dilation_mode,
            "dilations": list(self.dilations) if self.dilations is not None else None,
            "base_channels": self.base_channels,
            "se_reduction": self.se_reduction,
        }

    @property
    def info(self) -> ModelInfo:
        """The model-info record of this model, its form derived from its blocks (saved in checkpoints)."""
        return ModelInfo(
            model_name=self.model_name,
            config=self.config,
            class_names=tuple(self.class_names) if self.class_names is not None else None,
            preprocessing=self.preprocessing,
            runtime=self.runtime,
            form=form_of(self),
            module_type=type(self).__name__,
        )

    def stages(self) -> list[nn.Module]:
        return [self.stage0, self.stage1, self.stage2, self.stage3, self.stage4]

    @property
    def deploy(self) -> bool:
        """Whether every block is in its plain form: derived from the blocks, so it is right however they
        were converted (``repvgg.reparameterize``, a block's ``reparameterize``, timm's
        ``reparameterize_model``, the authors' ``switch_to_deploy`` loop)."""
        return form_of(self) == "deploy"

    def switch_to_deploy(self) -> None:
        """Convert every block in place (mmpretrain's and the authors' model-level name)."""
        for block in self.modules():
            if isinstance(block, RepVGGBlock):
                block.reparameterize()

    def freeze_stages(self, last: int) -> None:
        """Freeze stages 0..``last`` (-1: none): no gradients, and :meth:`train` keeps them in eval mode so
        their BatchNorm statistics stay those of the loaded weights."""
        if not isinstance(last, int) or last not in range(-1, 5):
            raise ModelConfigError(f"frozen_stages must be -1 (none) or 0-4, got {last!r}.")
        self.frozen_stages = last
        self._freeze()

    def _freeze(self) -> None:
        """No gradients for the frozen stages' parameters, those made since by a conversion too."""
        for stage in self.stages()[: self.frozen_stages + 1]:
            for parameter in stage.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "RepVGG":
        """As ``nn.Module.train``; frozen stages stay in eval mode without gradients (as mmpretrain's
        ``train`` re-freezes them), whatever was converted or unfrozen by hand since."""
        super().train(mode)
        self._freeze()
        if mode:
            for stage in self.stages()[: self.frozen_stages + 1]:
                stage.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_checkpoint = enable

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm's name); ``nn.Identity`` when the model has none."""
        return self.linear

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a new one for ``num_classes`` (0 removes it)."""
        reference = next(self.parameters())
        self.num_classes = num_classes
        self.linear = self._make_head(num_classes).to(reference.device, reference.dtype)

    def run_stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        """One stage's blocks in turn, each recomputed in the backward pass when ``use_checkpoint`` is on
        (while training): used by the classifier and the backbone alike."""
        checkpointing = self.use_checkpoint and self.training and torch.is_grad_enabled()
        # Stage 0 is a single block, as in the authors' code (keys ``stage0.rbr_dense...``).
        for block in stage if isinstance(stage, nn.Sequential) else (stage,):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles for this model: a copy spelled for TorchScript (gradient
        checkpointing left out), so that scripting never changes the model itself."""
        return ScriptableRepVGG(copy.deepcopy(self))

    def forward_features(self, x: Tensor) -> Tensor:
        for stage in self.stages():
            x = self.run_stage(stage, x)
        return x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's multi-scale API: the outputs of the stages ``indices`` (stage numbers 0-4; an int n for the
        last n stages; all by default), and, unless ``intermediates_only``, the final features.
        ``stop_early`` skips the stages after the last one asked for (with ``intermediates_only``)."""
        if indices is None:
            indices = range(5)
        elif isinstance(indices, int):
            indices = range(5 - indices, 5)
        chosen = sorted(set(indices))
        if not chosen or any(i not in range(5) for i in chosen):
            raise ModelConfigError(f"indices must name stages 0-4, got {list(chosen)}.")
        intermediates = []
        for index, stage in enumerate(self.stages()):
            if stop_early and intermediates_only and index > chosen[-1]:
                break
            x = self.run_stage(stage, x)
            if index in chosen:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

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


def stage_widths(width_multiplier: Sequence[float], base: int = 64) -> tuple[int, int, int, int, int]:
    """Output channels of stages 0-4 for ``width_multiplier = [a, a, a, b]`` (``base`` is the paper's 64)."""
    a1, a2, a3, b = width_multiplier
    return (
        min(64, int(base * a1)),  # the stem is at most 64 wide whatever the base, as in mmpretrain
        int(base * a1),
        int(2 * base * a2),
        int(4 * base * a3),
        int(8 * base * b),
    )


def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """A stem kernel for ``in_chans`` input channels made from one trained for another count, by timm's
    rule (``adapt_input_conv``): summed over the input channels for one channel; otherwise the channels are
    repeated to ``in_chans`` and the kernel scaled by old / new. A grey image (the same in every channel)
    then gives the trained model's output exactly for one channel and for multiples of the trained count."""
    old = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_chans / old)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (old / in_chans)


class ScriptableRepVGG(nn.Module):
    """A :class:`RepVGG` (a copy) as TorchScript compiles it: stage by stage, then the head."""

    def __init__(self, model: RepVGG) -> None:
        super().__init__()
        self.stage0, self.stage1, self.stage2 = model.stage0, model.stage1, model.stage2
        self.stage3, self.stage4, self.gap, self.linear = model.stage3, model.stage4, model.gap, model.linear

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stage0(x)))))
        return self.linear(torch.flatten(self.gap(x), 1))
