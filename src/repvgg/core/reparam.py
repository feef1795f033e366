"""Structural re-parameterization of whole networks, and the check that it is exact."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from repvgg.core import arguments
from repvgg.core.blocks import TRAIN_MODE_WARNING, RepVGGBlock, form_of
from repvgg.core.designs import block_design
from repvgg.core.fusion import OnlineConv
from repvgg.core.models import RepVGG
from repvgg.exceptions import ConversionError, RepVGGWarning

#: The one tolerance table: the largest relative difference (see :func:`relative_error`) accepted between two
#: computations of the same network, by the least precise dtype involved. float64 checks the fusion math
#: itself (~1e-15 observed); float32 covers stored float32 weights and other kernels (onnxruntime's Winograd,
#: oneDNN, TorchInductor: ~1e-6 observed); half precision rounds to ~1e-3.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}


def tolerance_for(*dtypes: torch.dtype) -> float:
    """The tolerance of the least precise of ``dtypes`` (any other dtype counts as half precision)."""
    return max(TOLERANCE.get(dtype, TOLERANCE[torch.float16]) for dtype in dtypes)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64: the one measure of agreement between outputs.

    Relative to the output's scale, never a bare absolute difference; 0-scale outputs compare absolutely.
    """
    expected = expected.detach().double()
    error = float((actual.detach().double() - expected).abs().max())
    scale = float(expected.abs().max())
    return error / scale if scale > 0 else error


def reparameterizable_blocks(module: nn.Module) -> list[RepVGGBlock]:
    """Every RepVGG block inside ``module`` (itself included), deployed or not."""
    return [m for m in module.modules() if isinstance(m, RepVGGBlock)]


def is_deployed(module: nn.Module) -> bool:
    """True when ``module`` holds RepVGG blocks and all of them are in their plain form."""
    blocks = reparameterizable_blocks(module)
    return bool(blocks) and all(block.deploy for block in blocks)


def nonfinite_weights(module: nn.Module) -> list[str]:
    """The names of ``module``'s floating-point weights and buffers that hold NaN or infinity."""
    return [
        name
        for name, tensor in module.state_dict().items()
        if isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]


def refuse_nonfinite(module: nn.Module, what: str, error_type: type[Exception] = ConversionError) -> None:
    """One sentence naming the first non-finite weights of ``what`` (a diverged run's), if there are any."""
    bad = nonfinite_weights(module)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise error_type(
            f"{what} holds weights that are not finite ({', '.join(bad[:3])}{more}): it comes from a "
            "diverged run; use an earlier checkpoint of it, or train again with a lower learning rate."
        )


def to_deploy_form(model: nn.Module) -> tuple[nn.Module, bool]:
    """An eval-mode, gradient-free copy of ``model`` with every RepVGG block converted.

    Returns the copy and whether a conversion was needed. A network without RepVGG blocks (a
    baseline such as a ResNet) is copied as it is.
    """
    deployed = copy.deepcopy(model).eval()
    converted = form_of(deployed) == "train"
    if converted:
        deployed = reparameterize(deployed, inplace=True)
    for parameter in deployed.parameters():
        parameter.requires_grad_(False)
    return deployed, converted


def is_convertible(module: nn.Module) -> bool:
    """True when ``module`` holds RepVGG blocks and every one of them can become one convolution
    (the ``relu_in_branch`` design cannot; a network without RepVGG blocks has nothing to convert)."""
    blocks = reparameterizable_blocks(module)
    return bool(blocks) and all(block.deploy or block_design(block.block).convertible for block in blocks)


def reparameterize(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Convert every RepVGG block inside ``module`` into its single 3x3 convolution.

    Works on any network that contains RepVGG blocks: a bare :class:`~repvgg.RepVGG`, or a detector or
    segmenter that uses one as its backbone. Returns the converted copy and leaves ``module`` untouched,
    unless ``inplace=True``. The conversion always uses BatchNorm running statistics; converting a
    module in training mode warns once, since its train-mode outputs use batch statistics instead.
    """
    blocks = reparameterizable_blocks(arguments.module(module, "module"))
    if not blocks:
        raise ConversionError(
            f"{type(module).__name__} contains no RepVGG blocks, so there is nothing to "
            "re-parameterize; build it with repvgg.create_model or repvgg.RepVGGBlock."
        )
    if any(block.training and not block.deploy for block in blocks):
        warnings.warn(TRAIN_MODE_WARNING, RepVGGWarning, stacklevel=2)
    converted = module if inplace else copy.deepcopy(module)
    for block in reparameterizable_blocks(converted):
        block.reparameterize(warn_if_training_mode=False)
    return converted


def trains_one_conv(block: RepVGGBlock) -> bool:
    """Whether a training-form block runs one convolution, then BatchNorm: the online and RepOpt designs."""
    design = block_design(block.block)
    return design.dense == "online" or design.gradient_multipliers


@torch.no_grad()
def start_merged_from(source: nn.Module, target: nn.Module) -> None:
    """Start ``target``, a network of blocks that train one convolution (``online``, ``repopt``), from
    ``source``, the same architecture with trained blocks of any convertible design, so that both compute the
    same function in eval mode.

    Each convolution takes the trained block's equivalent kernel (an online block's 1x1 weight and identity
    scale start at 0), and the BatchNorm after it passes the input through with the trained bias (running
    mean 0, variance 1 - eps, weight 1). Every other parameter and buffer (SE, the head) is copied.
    Fine-tuning then moves the kernel from where the trained network left it."""
    sources, targets = reparameterizable_blocks(source), reparameterizable_blocks(target)
    if len(sources) != len(targets) or not all(trains_one_conv(t) and not t.deploy for t in targets):
        raise ConversionError(
            "Starting a network of online or repopt blocks from a trained one needs the same architecture "
            f"({len(targets)} blocks, all online or repopt) and a trained network of as many convertible "
            f"blocks ({len(sources)})."
        )
    block_names = {name for name, module in target.named_modules() if isinstance(module, RepVGGBlock)}
    for trained, merged in zip(sources, targets, strict=True):
        kernel, bias = trained.equivalent_kernel_bias()
        if isinstance(merged.rbr_dense, OnlineConv):
            merged.rbr_dense.start_from(kernel)
            bn = merged.bn
        else:
            merged.rbr_dense.conv.weight.copy_(kernel)
            bn = merged.rbr_dense.bn
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias)
        merged.se.load_state_dict(trained.se.state_dict())
    rest = {
        key: value
        for key, value in source.state_dict().items()
        if not any(key.startswith(f"{name}.") for name in block_names)
    }
    target.load_state_dict({**target.state_dict(), **rest})


@torch.no_grad()
def randomize_batchnorm_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, in place.

    A freshly built network has mean 0, variance 1, weight 1 and bias 0 in every BatchNorm, which hides
    errors in the fusion math; checks of exactness should run on randomized statistics.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        values = torch.rand(like.shape, generator=generator, dtype=torch.float64)
        return (low + (high - low) * values).to(like.dtype)

    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            if bn.running_mean is not None and bn.running_var is not None:
                bn.running_mean.copy_(draw(bn.running_mean, -0.5, 0.5))
                bn.running_var.copy_(draw(bn.running_var, 0.5, 2.0))
            if bn.weight is not None and bn.bias is not None:
                bn.weight.copy_(draw(bn.weight, 0.5, 1.5))
                bn.bias.copy_(draw(bn.bias, -0.5, 0.5))
    return module


@dataclass(frozen=True)
class EquivalenceReport:
    """How far a converted network's outputs are from the multi-branch network's."""

    max_abs_error: float
    max_rel_error: float
    output_scale: float
    dtype: torch.dtype
    input_shape: tuple[int, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"max |deploy - train| = {self.max_abs_error:.3e} "
            f"({self.max_rel_error:.3e} of max |train| = {self.output_scale:.3g}; "
            f"{str(self.dtype).removeprefix('torch.')}, input {tuple(self.input_shape)}): "
            f"{verdict} at tolerance {self.tolerance:.0e}"
        )


def _input_channels(module: nn.Module) -> int:
    if isinstance(module, RepVGG):
        return module.in_chans
    first_conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ConversionError("Cannot tell the input channels; pass input_shape explicitly.")
    return first_conv.in_channels


def _outputs(module: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a forward pass returns (a backbone or detector may return lists or dicts)."""
    out = module(inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for t in out if isinstance(t, torch.Tensor)]


@torch.no_grad()
def verify_equivalence(
    reference: nn.Module,
    converted: nn.Module | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float64,
    tolerance: float | None = None,
    seed: int = 0,
) -> EquivalenceReport:
    """Compare a multi-branch network with its conversion on random input, in eval mode.

    Both networks are copied, cast to ``dtype`` and put in eval mode; the originals are not changed.
    Without ``converted``, a ``dtype`` copy of ``reference`` is converted, which checks the fusion math
    itself: in float64 it agrees to ~1e-15. A given ``converted`` network also carries the rounding
    of its stored weights (~1e-7 for float32). The default tolerance is :data:`TOLERANCE`'s for the least
    precise of ``dtype`` and those weights. The default input is non-square, ``(2, C, 64, 48)``.
    """
    arguments.module(reference, "reference")
    if converted is not None:
        arguments.module(converted, "converted")
    train_copy = copy.deepcopy(reference).to(dtype).eval()
    if converted is None:
        deploy_copy = reparameterize(train_copy)
        precisions = [dtype]
    else:
        deploy_copy = copy.deepcopy(converted).to(dtype).eval()
        precisions = [dtype, *(p.dtype for p in converted.parameters())]
    if tolerance is None:
        tolerance = tolerance_for(*precisions)
    if input_shape is None:
        input_shape = (2, _input_channels(reference), 64, 48)
    device = next(reference.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(input_shape, generator=generator, dtype=dtype).to(device)
    expected = _outputs(train_copy, inputs)
    actual = _outputs(deploy_copy, inputs)
    if len(expected) != len(actual) or any(e.shape != a.shape for e, a in zip(expected, actual, strict=True)):
        raise ConversionError(
            "The two networks return outputs of different shapes; they are not a train/deploy pair."
        )
    # Each output (a backbone returns one per stage) is compared relative to its own scale.
    pairs = list(zip(actual, expected, strict=True))
    return EquivalenceReport(
        max_abs_error=max(float((a - e).abs().max()) for a, e in pairs),
        max_rel_error=max(relative_error(a, e) for a, e in pairs),
        output_scale=max(float(e.abs().max()) for e in expected),
        dtype=dtype,
        input_shape=tuple(input_shape),
        tolerance=tolerance,
    )
