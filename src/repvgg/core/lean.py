"""Less activation memory for chains of conv -> BatchNorm -> ReLU blocks: one kept tensor per block, not two.

Autograd keeps two activation-sized tensors of every such block for the backward pass: the convolution's
output ``y`` (the BatchNorm's input) and the ReLU's output ``z`` (the next convolution's input). But ``z`` is
a cheap function of ``y``: ``relu(y * scale + shift)``, with the batch's per-channel ``scale`` and ``shift``.
:func:`batch_norm_relu` keeps ``y`` and the statistics, recomputes the ReLU's mask in the backward pass, and
marks its output with that recipe; a convolution of this module (:func:`conv2d`, and the online block's
merged-kernel convolution through :func:`save_input`) that reads a marked tensor keeps the recipe instead of
the tensor and recomputes the tensor in the backward pass. The idea is In-Place ABN's (Rota Bulò et al.,
CVPR 2018), without its invertible activation: one elementwise pass per block is recomputed, and the
ReLU's backward pass takes its mask from that recomputed output.

The outputs, gradients and running statistics are those of ``relu(bn(conv(x)))`` up to rounding. A tensor
modified in place after it was marked is kept as it is (its recipe no longer holds), and the blocks take
this path only where it computes what their layers would: see ``RepVGGBlock``.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_RECIPE = "_repvgg_recomputable_from"
_ENABLED: ContextVar[bool] = ContextVar("repvgg_lean_enabled", default=True)


def enabled() -> bool:
    """Whether blocks may take this module's path (everywhere but inside :func:`layer_by_layer`)."""
    return _ENABLED.get()


@contextmanager
def layer_by_layer() -> Iterator[None]:
    """Inside it, blocks run their conv, BN and ReLU layers one by one, keeping both activations: for a
    backward pass that is itself differentiated (``create_graph=True``, e.g. a gradient penalty), which this
    module's once-differentiable functions refuse, or to compare the two paths."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


@dataclass(frozen=True)
class _Recipe:
    """How to recompute a ReLU output: ``relu(pre_activation * scale + shift)``, while ``version`` holds.
    ``recomputed`` passes the output a convolution's backward pass recomputed to the ReLU's backward pass,
    which comes next and needs only its sign: one recomputation per block, not two."""

    pre_activation: Tensor
    scale: Tensor
    shift: Tensor
    version: int
    recomputed: list[Tensor]


def _normalized(pre_activation: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y * scale + shift`` in ``y``'s dtype: BatchNorm's output (up to rounding), recomputed. The float32
    statistics of a half-precision ``y`` are applied in float32, as BatchNorm does."""
    return torch.addcmul(shift, pre_activation, scale).to(pre_activation.dtype)


def _relu_of_normalized(pre_activation: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return _normalized(pre_activation, scale, shift).relu_()


def save_input(ctx: Any, inputs: Tensor, *tensors: Tensor | None) -> None:
    """``ctx.save_for_backward(inputs, *tensors)``, keeping the recipe of ``inputs`` if it has a valid one."""
    recipe: _Recipe | None = getattr(inputs, _RECIPE, None)
    ctx.recomputes_input = recipe is not None and recipe.version == inputs._version
    if ctx.recomputes_input:
        ctx.recomputed = recipe.recomputed
        ctx.save_for_backward(recipe.pre_activation, recipe.scale, recipe.shift, *tensors)
    else:
        ctx.save_for_backward(inputs, *tensors)


def saved_input(ctx: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The input and the other tensors :func:`save_input` saved, the input recomputed if need be."""
    saved = ctx.saved_tensors
    if ctx.recomputes_input:
        inputs = _relu_of_normalized(*saved[:3])
        ctx.recomputed[:] = [inputs]
        return inputs, saved[3:]
    return saved[0], saved[1:]


def _count_per_channel(inputs: Tensor) -> int:
    return inputs.numel() // inputs.shape[1]


def can_take(bn: nn.Module, pre_activation: Tensor) -> bool:
    """Whether :func:`batch_norm_relu` computes what ``relu(bn(pre_activation))`` would in training: a plain
    affine ``BatchNorm2d`` with running statistics and no hooks, an input of the parameters' dtype or, under
    autocast, a half-precision input to float32 parameters, and more than one value per channel."""
    if not (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats):
        return False
    dtypes = (pre_activation.dtype, bn.weight.dtype)
    return (
        not has_hooks(bn)
        and (
            dtypes[0] == dtypes[1]
            or (dtypes[0] in (torch.float16, torch.bfloat16) and dtypes[1] == torch.float32)
        )
        and _count_per_channel(pre_activation) > 1
    )


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (forward or backward, its own or global ones) that bypassing
    it skips."""
    from torch.nn.modules import module as module_globals

    return any(
        (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
            module_globals._global_forward_hooks,
            module_globals._global_forward_pre_hooks,
            module_globals._global_backward_hooks,
            module_globals._global_backward_pre_hooks,
        )
    )


def batch_norm_relu(pre_activation: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """``relu(bn(pre_activation))`` in training mode (``bn``'s running statistics updated as it would),
    keeping only ``pre_activation`` for the backward pass and marking the output with its recipe. Only where
    :func:`can_take` says so."""
    assert bn.num_batches_tracked is not None
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
    # nn.BatchNorm2d's factor: ``momentum``, or the cumulative average's 1 / batches when it is None
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    recomputed: list[Tensor] = []
    output, scale, shift = _BatchNormReLU.apply(
        pre_activation, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps, recomputed
    )
    setattr(output, _RECIPE, _Recipe(pre_activation, scale, shift, output._version, recomputed))
    return output


class _BatchNormReLU(torch.autograd.Function):
    """The autograd of :func:`batch_norm_relu`: ATen's BatchNorm (running statistics included) and an
    in-place ReLU forward; backward, BatchNorm's backward behind the ReLU's mask, recomputed from the kept
    input and statistics. Also returns the per-channel ``scale`` and ``shift`` of the normalization."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        pre_activation: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        recomputed: list[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        output, mean, invstd = torch.ops.aten.native_batch_norm(
            pre_activation, weight, bias, running_mean, running_var, True, momentum, eps
        )
        output.relu_()
        scale = (weight * invstd).reshape(-1, 1, 1)
        shift = (bias - mean * scale.flatten()).reshape(-1, 1, 1)
        ctx.eps, ctx.recomputed = eps, recomputed
        ctx.save_for_backward(pre_activation, weight, mean, invstd, scale, shift)
        ctx.mark_non_differentiable(scale, shift)
        return output, scale, shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: Tensor, _grad_scale: Tensor, _grad_shift: Tensor
    ) -> tuple[Tensor | None, ...]:
        pre_activation, weight, mean, invstd, scale, shift = ctx.saved_tensors
        # The ReLU's mask from its output, if the next convolution's backward pass recomputed it (the sign
        # of the output is that of the normalized input), else from the normalized input recomputed here.
        signed = ctx.recomputed.pop() if ctx.recomputed else _normalized(pre_activation, scale, shift)
        grad_normalized = torch.ops.aten.threshold_backward(grad_output, signed, 0)
        del signed
        needs = ctx.needs_input_grad
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_normalized,
            pre_activation,
            weight,
            None,
            None,
            mean,
            invstd,
            True,
            ctx.eps,
            [needs[0], needs[1], needs[2]],
        )
        return (*grads, None, None, None, None, None)


def can_convolve(conv: nn.Module) -> bool:
    """Whether :func:`conv2d` computes what ``conv`` would: a bias-free, zero-padded ``nn.Conv2d`` (numeric
    padding) without hooks."""
    return (
        type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not has_hooks(conv)
    )


def conv2d(inputs: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(inputs)`` for a convolution :func:`can_convolve` takes, keeping the recipe of a marked input
    instead of the input for the backward pass."""
    return _Convolution.apply(inputs, conv.weight, conv)


class _Convolution(torch.autograd.Function):
    """A plain convolution whose backward pass recomputes a marked input (see :func:`save_input`)."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, weight: Tensor, conv: nn.Conv2d) -> Tensor:  # type: ignore[override]
        ctx.conv = conv
        save_input(ctx, inputs, weight)
        return F.conv2d(inputs, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inputs, (weight,) = saved_input(ctx)
        conv: nn.Conv2d = ctx.conv
        needs = ctx.needs_input_grad
        geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)  # pairs of ints: see can_convolve
        return (*convolution_backward(grad_output, inputs, weight, geometry, needs[0], needs[1]), None)


#: A convolution's stride, padding and dilation as (height, width) pairs, and its groups.
Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]


def convolution_backward(
    grad_output: Tensor, inputs: Tensor, weight: Tensor, geometry: Geometry, for_input: bool, for_weight: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of ``F.conv2d(inputs, weight)`` (bias-free, ``geometry``) for the input and the weight,
    as asked, in their dtypes: computed in ``grad_output``'s, the dtype autocast ran the convolution in."""
    stride, padding, dilation, groups = geometry
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_output,
        inputs.to(grad_output.dtype),
        weight.to(grad_output.dtype),
        None,
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        groups,
        [for_input, for_weight, False],
    )
    return (
        None if grad_input is None else grad_input.to(inputs.dtype),
        None if grad_weight is None else grad_weight.to(weight.dtype),
    )
