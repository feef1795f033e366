"""RepOpt-VGG (Ding et al., "Re-parameterizing Your Optimizers rather than Architectures", ICLR 2023): train
the plain network directly, with the gradients a multi-branch block would give it.

A block whose branches are a 3x3 conv, a 1x1 conv and the identity, each times a constant per-channel scale
(``s3``, ``s1``, ``si``; the paper's "constant-scale linear addition", CSLA), followed by one BatchNorm,
computes the same function as one 3x3 conv with kernel ``K = s3 W3 + s1 pad(W1) + si I`` followed by that
BatchNorm: the :class:`~repvgg.core.fusion.OnlineConv` kernel. An SGD step on ``W3`` and ``W1`` (momentum
included) moves ``K`` by ``-lr (s3^2 G + s1^2 G_centre)``, where ``G`` is the gradient with respect to ``K``:
so the plain conv trained with its gradient multiplied by ``M = s3^2 + s1^2 [centre tap]`` takes exactly the
multi-branch block's steps, and starts from the CSLA block's initial kernel. Weight decay then acts on ``K``
(as the RepOpt paper's optimizer does); gradient clipping breaks the equality.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from repvgg.core.blocks import RepVGGBlock
from repvgg.core.designs import block_design
from repvgg.core.fusion import ConvBN, OnlineConv
from repvgg.exceptions import ModelConfigError


@dataclass(frozen=True)
class BranchScales:
    """The constant per-output-channel scales of a CSLA block's branches (``identity`` None: no identity)."""

    dense: Tensor
    one_by_one: Tensor
    identity: Tensor | None

    @classmethod
    def unit(cls, block: RepVGGBlock) -> "BranchScales":
        """Scales of 1: the branches simply summed."""
        return cls.constant(block, 1.0)

    @classmethod
    def paper(cls, block: RepVGGBlock, position: int) -> "BranchScales":
        """RepOpt-VGG's constants without a search: the conv branches of the ``position``-th block of a stage
        (from 0) scaled by ``sqrt(2 / position)`` (1 for the first), the identity by 1, so that the summed
        branches of a deep stage do not swamp the identity path."""
        return cls.constant(block, math.sqrt(2.0 / position) if position > 0 else 1.0)

    @classmethod
    def constant(cls, block: RepVGGBlock, conv_scale: float) -> "BranchScales":
        """``conv_scale`` for both conv branches of every channel, 1 for the identity (where there is one)."""
        convs = torch.full((block.out_channels,), conv_scale)
        return cls(convs, convs.clone(), torch.ones(block.out_channels) if _has_identity(block) else None)

    @classmethod
    def of(cls, conv: OnlineConv) -> "BranchScales":
        """The learned scales of an online block (a short training of it is the paper's "hyper-search")."""
        identity = conv.scale_identity.detach().clone() if conv.scale_identity is not None else None
        return cls(conv.scale_dense.detach().clone(), conv.scale_1x1.detach().clone(), identity)


#: The constant branch scales a RepOpt run can take without a search (see :class:`BranchScales`), and the
#: one it takes by default.
SCALE_RULES = ("paper", "unit")
DEFAULT_SCALE_RULE = "paper"


def _has_identity(block: RepVGGBlock) -> bool:
    """Whether the multi-branch block a RepOpt block stands for has an identity branch (the shape is kept)."""
    return block.in_channels == block.out_channels and block.stride == 1


def repopt_blocks(model: torch.nn.Module) -> dict[str, RepVGGBlock]:
    """The training-form RepOpt blocks of ``model`` by name."""
    return {
        name: block
        for name, block in model.named_modules()
        if isinstance(block, RepVGGBlock)
        and not block.deploy
        and block_design(block.block).gradient_multipliers
    }


def rule_scales(model: torch.nn.Module, rule: str) -> dict[str, BranchScales]:
    """Each RepOpt block's scales by a :data:`SCALE_RULES` rule; a block's position in its stage is the last
    part of its name (``stage2.3`` is the fourth block of stage 2; a block not in a stage is first)."""
    if rule not in SCALE_RULES:
        raise ModelConfigError(f"Unknown branch-scale rule {rule!r}: choose from {', '.join(SCALE_RULES)}.")
    scales = {}
    for name, block in repopt_blocks(model).items():
        last = name.rsplit(".", 1)[-1]
        position = int(last) if last.isdigit() else 0
        scales[name] = BranchScales.paper(block, position) if rule == "paper" else BranchScales.unit(block)
    return scales


def searched_scales(model: torch.nn.Module, state: Mapping[str, Tensor]) -> dict[str, BranchScales]:
    """The learned scales of an online network (its ``state``: a checkpoint's state dict) for each RepOpt
    block of ``model`` by name: RepOpt-VGG's "hyper-search", whose result are the constants of the
    optimizer. The online network must be the same architecture (block for block, channel for channel)."""
    found = {}
    for name, block in repopt_blocks(model).items():
        prefix = f"{name}.rbr_dense."
        keys = [f"{prefix}scale_dense", f"{prefix}scale_1x1"]
        has_identity = _has_identity(block)
        keys += [f"{prefix}scale_identity"] * has_identity
        missing = [key for key in keys if key not in state]
        wrong = [key for key in keys if key in state and state[key].shape != (block.out_channels,)]
        if missing or wrong:
            raise ModelConfigError(
                f"The branch scales are not those of an `online` run of this model: "
                f"{'no ' + missing[0] if missing else wrong[0] + ' has another shape'}; give the checkpoint "
                "of an `online` run (`block` online) of the same model and channels."
            )
        values = [state[key].detach().to(torch.float32).clone() for key in keys]
        found[name] = BranchScales(values[0], values[1], values[2] if has_identity else None)
    return found


def repopt_conv(block: RepVGGBlock) -> torch.nn.Conv2d:
    """The plain convolution of a RepOpt block, refusing any other block."""
    if (
        block.deploy
        or not block_design(block.block).gradient_multipliers
        or not isinstance(block.rbr_dense, ConvBN)
    ):
        raise ModelConfigError(
            f"Gradient multipliers belong to the training form of `repopt` blocks; this is a {block.block!r} "
            f"block{' (deployed)' if block.deploy else ''}."
        )
    return block.rbr_dense.conv


def gradient_multiplier(block: RepVGGBlock, scales: BranchScales) -> Tensor:
    """``M``, the factor of the plain kernel's gradient, shaped like the kernel (see the module's doc)."""
    conv = repopt_conv(block)
    kernel = conv.weight
    multiplier = scales.dense.to(kernel).reshape(-1, 1, 1, 1).square().expand_as(kernel).clone()
    centre_h, centre_w = kernel.shape[-2] // 2, kernel.shape[-1] // 2
    multiplier[:, :, centre_h, centre_w] += scales.one_by_one.to(kernel).reshape(-1, 1).square()
    return multiplier


@torch.no_grad()
def initialize_like_csla(block: RepVGGBlock, scales: BranchScales) -> None:
    """Give a RepOpt block's plain kernel the initial value of the CSLA block it stands for: freshly
    initialised 3x3 and 1x1 kernels and the identity, each times its scale, summed."""
    conv = repopt_conv(block)
    branches = OnlineConv(
        block.in_channels,
        block.out_channels,
        block.kernel_size,
        stride=block.stride,
        padding=block.padding,
        dilation=block.dilation,
        groups=block.groups,
    ).to(conv.weight)
    branches.scale_dense.copy_(scales.dense)
    branches.scale_1x1.copy_(scales.one_by_one)
    if branches.scale_identity is not None:
        branches.scale_identity.copy_(scales.identity if scales.identity is not None else 0.0)
    conv.weight.copy_(branches.kernel())
