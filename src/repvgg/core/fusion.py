"""The fusion math of structural re-parameterization, in one place.

Every trainable branch of every block type is reduced to an *equivalent kernel and bias*: a single
convolution kernel of the block's kernel size that gives exactly the branch's output in eval mode
(BatchNorm using its running statistics). A block's deploy-time convolution is the sum of its
branches' kernels and biases. All functions here are plain differentiable tensor expressions, so the
same code serves conversion, custom L2 regularisation and quantization studies.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repvgg.core.lean import convolution_backward, save_input, saved_input
from repvgg.exceptions import ConversionError


class ConvBN(nn.Sequential):
    """A bias-free convolution followed by BatchNorm: the conv branches of a RepVGG block.

    The children are named ``conv`` and ``bn`` as in the authors' code, so their checkpoints load as is.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.conv = bare_conv(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self.bn = nn.BatchNorm2d(out_channels)


def as_pair(value: int | tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """A convolution's size, stride, padding or dilation as a (height, width) pair of ints."""
    if isinstance(value, int):
        return (value, value)
    first, second = tuple(value)
    return (int(first), int(second))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """A plain convolution layer of the non-RepVGG parts (heads, the residual baseline): conv, BN, ReLU."""
    return nn.Sequential(
        ConvBN(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
        nn.ReLU(inplace=True),
    )


def bare_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> nn.Conv2d:
    """A bias-free convolution: in :class:`ConvBN`, or a branch whose BatchNorm comes after the sum."""
    pointwise = as_pair(kernel_size) == (1, 1) and as_pair(padding) == (0, 0)
    return (PointwiseConv2d if pointwise else nn.Conv2d)(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
        padding_mode=padding_mode,
    )


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution that picks the pixels its stride lands on, then convolves them with stride 1.

    The same outputs and gradients as :class:`torch.nn.Conv2d`, by another route: oneDNN's strided 1x1
    kernels are ~1.6x slower on the CPU, and their weight gradient in channels_last corrupts memory on
    AVX-512 CPUs (torch 2.14; it crashes channels_last or ``torch.compile`` training at 96 px and up).
    State-dict keys and attributes (``stride`` included) are those of ``nn.Conv2d``.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding != (0, 0):  # padded since (an edit): nothing to pick, convolve as nn.Conv2d does
            if self.padding_mode != "zeros":
                padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
            return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        picked = input[:, :, :: self.stride[0], :: self.stride[1]]  # a view; stride 1 picks every pixel
        return F.conv2d(picked, weight, bias, 1, 0, self.dilation, self.groups)


class KernelConv(nn.Module):
    """A convolution whose kernel is a function of parameters, computed at every step (re-parameterization
    while training): subclasses give :meth:`kernel`. ``weight`` holds a PyTorch-initialised kernel; the
    identity terms of subclasses exist only when the convolution keeps the shape (same channels, stride 1).
    Bias-free; zero padding only."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if padding_mode != "zeros":
            raise ConversionError(f"{type(self).__name__} supports only zero padding.")
        self.weight = nn.Conv2d(in_channels, out_channels, kernel_size, groups=groups, bias=False).weight
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_channels = in_channels
        self.has_identity = in_channels == out_channels and stride == 1

    def kernel(self) -> Tensor:
        """The kernel the convolution applies, a differentiable function of the parameters."""
        raise NotImplementedError

    def identity(self, like: Tensor) -> Tensor:
        """The identity kernel of this convolution's shape, as ``like``'s dtype and device."""
        size = (like.shape[-2], like.shape[-1])
        return identity_kernel(self.in_channels, self.groups, size, dtype=like.dtype, device=like.device)

    def forward(self, inputs: Tensor) -> Tensor:
        return F.conv2d(inputs, self.kernel(), None, self.stride, self.padding, self.dilation, self.groups)


class IdentityPlusConv(KernelConv):
    """A convolution whose kernel is the identity plus a learned kernel.

    ``normalized=False``: ``K = I + W`` (the paper's "trivial re-param"). ``normalized=True``: DiracNet's
    ``K = diag(a) I + diag(b) W / ||W||`` with ``||W||`` the L2 norm of each output channel's kernel and
    ``a``, ``b`` learned per channel. Without an identity term (the shape changes) the kernel is ``W`` (or
    ``diag(b) W / ||W||``).
    """

    def __init__(self, *args: Any, normalized: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.normalized = normalized
        if normalized:
            out_channels = self.weight.shape[0]
            self.alpha = nn.Parameter(torch.ones(out_channels))
            self.beta = nn.Parameter(torch.full((out_channels,), 0.1))

    def kernel(self) -> Tensor:
        kernel = self.weight
        if self.normalized:
            norm = kernel.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
            kernel = self.beta.reshape(-1, 1, 1, 1) * kernel / norm
        if self.has_identity:
            scale = self.alpha.reshape(-1, 1, 1, 1) if self.normalized else 1
            kernel = kernel + scale * self.identity(kernel)
        return kernel


class OnlineConv(KernelConv):
    """The three branches of a RepVGG block merged into one kernel at every step (OREPA's online
    re-parameterization, Hu et al., CVPR 2022): ``K = diag(s3) W3 + diag(s1) pad(W1) + diag(si) I``.

    The branches' BatchNorms are replaced by the learned per-channel scales ``s3``, ``s1``, ``si`` (OREPA's
    linear scaling layers, initialised to 1) and the block puts one BatchNorm after the convolution; the
    kernel is a differentiable function of the parameters, so one convolution runs per step instead of
    three. The forward pass goes through :class:`_MergedKernelConvolution`, which keeps only the input for
    the backward pass and recomputes the kernel there; :meth:`kernel` is the same function in plain autograd
    (conversion and tests use it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        out_channels, in_per_group = self.weight.shape[:2]
        self.weight_1x1 = nn.Conv2d(
            in_per_group * self.groups, out_channels, 1, groups=self.groups, bias=False
        ).weight
        self.scale_dense = nn.Parameter(torch.ones(out_channels))
        self.scale_1x1 = nn.Parameter(torch.ones(out_channels))
        self.scale_identity = nn.Parameter(torch.ones(out_channels)) if self.has_identity else None

    def kernel(self) -> Tensor:
        size = (self.weight.shape[-2], self.weight.shape[-1])
        kernel = self.scale_dense.reshape(-1, 1, 1, 1) * self.weight
        kernel = kernel + self.scale_1x1.reshape(-1, 1, 1, 1) * pad_kernel(self.weight_1x1, size)
        if self.scale_identity is not None:
            kernel = kernel + self.scale_identity.reshape(-1, 1, 1, 1) * self.identity(kernel)
        return kernel

    def forward(self, inputs: Tensor) -> Tensor:
        return _MergedKernelConvolution.apply(
            inputs, self, self.weight, self.weight_1x1, self.scale_dense, self.scale_1x1, self.scale_identity
        )

    def identity_centre(self, like: Tensor) -> Tensor:
        """The centre tap of the identity kernel, ``(out, in / groups)``, as ``like``'s dtype and device."""
        return identity_kernel(self.in_channels, self.groups, (1, 1), dtype=like.dtype, device=like.device)[
            :, :, 0, 0
        ]

    def merged_kernel(self) -> Tensor:
        """:meth:`kernel` without autograd and in fewer passes over the kernel (a 3x3 kernel and a few
        centre-tap updates): what each step convolves with."""
        with torch.no_grad():
            kernel = self.weight * self.scale_dense.reshape(-1, 1, 1, 1)
            centre = kernel[:, :, self.weight.shape[-2] // 2, self.weight.shape[-1] // 2]
            centre += self.weight_1x1[:, :, 0, 0] * self.scale_1x1.reshape(-1, 1)
            if self.scale_identity is not None:
                centre += self.identity_centre(kernel) * self.scale_identity.reshape(-1, 1)
        return kernel

    @torch.no_grad()
    def start_from(self, kernel: Tensor) -> None:
        """Make :meth:`kernel` equal ``kernel`` (a trained block's equivalent kernel): the 3x3 weight takes
        it, the 1x1 weight and the identity's scale start at 0 and the other scales at 1."""
        self.weight.copy_(kernel)
        self.weight_1x1.zero_()
        self.scale_dense.fill_(1.0)
        self.scale_1x1.fill_(1.0)
        if self.scale_identity is not None:
            self.scale_identity.zero_()


class _MergedKernelConvolution(torch.autograd.Function):
    """``conv(x, K(params))`` of an :class:`OnlineConv`, saving only ``x`` for the backward pass.

    Autograd through :meth:`OnlineConv.kernel` would keep every block's merged kernel alive until the
    backward pass and run a handful of kernel-sized operations each way; here the kernel is recomputed in the
    backward pass and the parameters' gradients come from the kernel's gradient ``G`` in closed form:
    ``dW3 = s3 G``, ``ds3 = sum(G W3)``, ``dW1 = s1 G_c``, ``ds1 = sum(G_c W1)``, ``dsi = sum(G_c I_c)``
    (``_c``: the centre tap). The convolution runs in the dtype autocast gives it, as ``F.conv2d`` would. An
    input that :mod:`repvgg.core.lean` can recompute is not kept either.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        inputs: Tensor,
        conv: OnlineConv,
        weight: Tensor,
        weight_1x1: Tensor,
        scale_dense: Tensor,
        scale_1x1: Tensor,
        scale_identity: Tensor | None,  # an input so that autograd gives it a gradient; its value is unused
    ) -> Tensor:
        output = F.conv2d(
            inputs, conv.merged_kernel(), None, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        ctx.conv = conv
        save_input(ctx, inputs, weight, weight_1x1, scale_dense, scale_1x1)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inputs, (weight, weight_1x1, scale_dense, scale_1x1) = saved_input(ctx)
        conv: OnlineConv = ctx.conv
        needs = ctx.needs_input_grad
        kernel = conv.merged_kernel()
        geometry = (as_pair(conv.stride), as_pair(conv.padding), as_pair(conv.dilation), conv.groups)
        grad_input, grad_kernel = convolution_backward(
            grad_output, inputs, kernel, geometry, needs[0], any(needs[2:])
        )
        if grad_kernel is None:
            return (grad_input,) + (None,) * 6
        centre = grad_kernel[:, :, weight.shape[-2] // 2, weight.shape[-1] // 2]
        grads_1x1 = (
            (centre * scale_1x1.reshape(-1, 1)).reshape(weight_1x1.shape) if needs[3] else None,
            (centre * weight_1x1[:, :, 0, 0]).sum(1) if needs[5] else None,
            (centre * conv.identity_centre(centre)).sum(1) if needs[6] else None,
        )
        # The kernel-sized work reuses two buffers, the recomputed kernel's and the kernel's gradient's (which
        # becomes the 3x3 weight's): at 28 px the kernels, not the activations, are most of the memory.
        grad_scale_dense = torch.mul(grad_kernel, weight, out=kernel).sum((1, 2, 3)) if needs[4] else None
        del kernel
        grad_weight = grad_kernel.mul_(scale_dense.reshape(-1, 1, 1, 1)) if needs[2] else None
        return (grad_input, None, grad_weight, grads_1x1[0], grad_scale_dense, grads_1x1[1], grads_1x1[2])


def bn_scale_shift(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """Per-channel ``(t, s)`` such that ``bn(x) == t * x + s`` in eval mode.

    ``t = gamma / sqrt(running_var + eps)`` and ``s = beta - running_mean * t``; a BatchNorm without
    affine parameters has ``gamma = 1`` and ``beta = 0``.
    """
    if bn.running_var is None or bn.running_mean is None:
        raise ConversionError(
            "A BatchNorm without running statistics (track_running_stats=False) cannot be fused; "
            "build the block with ordinary BatchNorm2d layers."
        )
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fuse_conv_bn(kernel: Tensor, bn: _BatchNorm, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the convolution (``kernel``, ``bias``) that precedes it.

    ``bn(conv(x) + b) == conv'(x) + b'`` with ``conv' = t * kernel`` and ``b' = t * b + s``.
    """
    scale, shift = bn_scale_shift(bn)
    if bias is not None:
        shift = shift + bias * scale
    return kernel * scale.reshape(-1, 1, 1, 1), shift


def pad_kernel(kernel: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad a smaller kernel (1x1, 3x1, 1x3, ...) to ``size``, keeping it centred."""
    kh, kw = kernel.shape[-2:]
    th, tw = size
    if (th - kh) % 2 or (tw - kw) % 2 or kh > th or kw > tw:
        raise ConversionError(
            f"A {kh}x{kw} kernel cannot be centred in a {th}x{tw} kernel; "
            "both sizes must be odd and the target no smaller."
        )
    if (kh, kw) == (th, tw):
        return kernel
    pad_h, pad_w = (th - kh) // 2, (tw - kw) // 2
    return F.pad(kernel, [pad_w, pad_w, pad_h, pad_h])


def identity_kernel(
    channels: int,
    groups: int,
    size: tuple[int, int],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The kernel of a (grouped) convolution that returns its input unchanged.

    Output channel ``i`` reads input channel ``i % (channels // groups)`` of its own group at the
    kernel centre.
    """
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *size, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % per_group, size[0] // 2, size[1] // 2] = 1
    return kernel


def branch_kernel_bias(
    branch: nn.Module,
    *,
    in_channels: int,
    groups: int,
    kernel_size: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The equivalent ``kernel_size`` kernel and bias of one branch of a block.

    A branch is a :class:`ConvBN`, a lone ``BatchNorm2d`` (the identity branch with BN), an
    ``nn.Identity`` (the identity branch without BN), a ``Conv2d`` with or without bias, an
    :class:`IdentityPlusConv` or an :class:`OnlineConv`. Every block
    type converts through this one function.
    """
    if isinstance(branch, KernelConv):
        kernel = pad_kernel(branch.kernel(), kernel_size)
        return kernel, kernel.new_zeros(kernel.shape[0])
    if isinstance(branch, nn.Identity):
        kernel = identity_kernel(in_channels, groups, kernel_size, dtype=dtype, device=device)
        return kernel, kernel.new_zeros(in_channels)
    if isinstance(branch, ConvBN):
        return fuse_conv_bn(pad_kernel(branch.conv.weight, kernel_size), branch.bn)
    if isinstance(branch, nn.Conv2d):
        kernel = pad_kernel(branch.weight, kernel_size)
        bias = branch.bias if branch.bias is not None else kernel.new_zeros(kernel.shape[0])
        return kernel, bias
    if isinstance(branch, _BatchNorm):  # BatchNorm2d, or SyncBatchNorm after convert_sync_batchnorm
        scale, shift = bn_scale_shift(branch)
        kernel = identity_kernel(in_channels, groups, kernel_size, dtype=scale.dtype, device=scale.device)
        return kernel * scale.reshape(-1, 1, 1, 1), shift
    raise ConversionError(
        f"Cannot re-parameterize a branch of type {type(branch).__name__}; "
        "supported branches are ConvBN, Conv2d, BatchNorm2d, Identity, IdentityPlusConv and OnlineConv."
    )
