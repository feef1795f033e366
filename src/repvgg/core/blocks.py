"""The RepVGG building block: three branches while training, one 3x3 convolution when deployed."""

import warnings
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from repvgg.core import lean
from repvgg.core.arguments import probability
from repvgg.core.designs import block_design
from repvgg.core.fusion import (
    ConvBN,
    IdentityPlusConv,
    KernelConv,
    OnlineConv,
    as_pair,
    bare_conv,
    bn_scale_shift,
    branch_kernel_bias,
    fuse_conv_bn,
)
from repvgg.core.lean import batch_norm_relu, can_convolve, can_take, conv2d, has_hooks
from repvgg.exceptions import ConversionError, ModelConfigError, RepVGGWarning

TRAIN_MODE_WARNING = (
    "Converting a module in training mode: the fused kernels use the BatchNorm running statistics, "
    "so they match this module's outputs only in eval mode; call .eval() before comparing outputs."
)


def form_of(module: nn.Module) -> str:
    """``deploy`` when every RepVGG block inside ``module`` is converted, ``train`` when none is, ``none``
    when it holds no RepVGG block. Derived from the blocks, so it is right after any way of converting."""
    blocks = [m for m in module.modules() if isinstance(m, RepVGGBlock)]
    if not blocks:
        return "none"
    deployed = sum(block.deploy for block in blocks)
    if deployed == len(blocks):
        return "deploy"
    if deployed:
        raise ConversionError(
            "Some RepVGG blocks of this model are converted and others are not; convert all of them with "
            "repvgg.reparameterize(model)."
        )
    return "train"


def warn_if_training(module: nn.Module) -> None:
    """Warn once if ``module`` converts while in training mode (the commonest source of 'mismatch')."""
    if module.training:
        warnings.warn(TRAIN_MODE_WARNING, RepVGGWarning, stacklevel=3)


class SEBlock(nn.Module):
    """Squeeze-and-excitation on globally average-pooled input, as in the authors' D2se.

    Pools over the whole feature map whatever its height and width (the authors' block pools with a
    kernel as wide as the input, which breaks on non-square inputs). Children are named ``down`` and
    ``up`` as in the authors' code.
    """

    def __init__(self, input_channels: int, internal_neurons: int) -> None:
        super().__init__()
        self.input_channels = input_channels
        self.down = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, bias=True)

    def forward(self, inputs: Tensor) -> Tensor:
        squeezed = inputs.mean(dim=(2, 3), keepdim=True)
        excitation = torch.sigmoid(self.up(torch.relu(self.down(squeezed))))
        return inputs * excitation


class RepVGGBlock(nn.Module):
    """A RepVGG block: three branches while training, one 3x3 convolution once deployed.

    Training form: ``ReLU(SE(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)))``; deploy form:
    ``ReLU(SE(conv3x3(x)))``, SE only in D2se.
    The identity branch exists only when ``in_channels == out_channels`` and ``stride == 1``. The 1x1
    branch has the stride and groups of the 3x3 branch. Module names (``rbr_dense``, ``rbr_1x1``,
    ``rbr_identity``, ``rbr_reparam``, ``se``) follow the authors' code, so their checkpoints load
    unchanged and code written against their block keeps working.

    ``padding`` defaults to ``dilation * (kernel_size // 2)`` ("same" padding), the only padding at which
    the three branches line up; any other value is refused.

    ``drop_path`` (stochastic depth, as timm's RepVGG blocks) drops, per sample and while training, the sum
    of the branches other than the identity, scaled by ``1 / (1 - drop_path)``; only a block with an identity
    branch has it (without one, a dropped block would pass nothing). In eval mode it does nothing, so the
    converted block computes the same function whatever the rate.

    ``block`` picks a :class:`BlockDesign` from :data:`BLOCK_DESIGNS` (default ``"repvgg"``): e.g.
    ``"qarepvgg"`` trains with a bare 1x1 and identity branch and one BatchNorm after the sum (named
    ``bn``). Every design has the same deploy form.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_se: bool = False,
        block: str = "repvgg",
        se_reduction: int = 16,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        design = block_design(block)
        drop_path = probability(drop_path, "drop_path")
        same_padding = dilation * (kernel_size // 2)
        if padding is None:
            padding = same_padding
        if kernel_size % 2 == 0 or padding != same_padding:
            raise ModelConfigError(
                f"RepVGGBlock needs an odd kernel size with padding = dilation * (kernel_size // 2) "
                f"(= {same_padding} here) so that its branches line up; got kernel_size={kernel_size}, "
                f"padding={padding}."
            )
        if in_channels % groups or out_channels % groups:
            raise ModelConfigError(
                f"groups={groups} must divide both in_channels={in_channels} and out_channels={out_channels}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.deploy = deploy
        self.block = block
        self.drop_path = 0.0  # set below for a training-form block with an identity branch

        self.se: nn.Module = (
            SEBlock(out_channels, internal_neurons=max(1, out_channels // se_reduction))
            if use_se
            else nn.Identity()
        )
        self.nonlinearity = nn.ReLU(inplace=True)  # its input, a fresh sum, is needed by no one else

        if deploy:
            self.rbr_reparam = self._deploy_conv()
            return
        make_dense = {
            "bn": ConvBN,
            "plain": bare_conv,
            "trivial": partial(IdentityPlusConv, normalized=False),
            "dirac": partial(IdentityPlusConv, normalized=True),
            "online": OnlineConv,
        }[design.dense]
        self.rbr_dense = make_dense(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        )
        self.rbr_asymmetric: nn.ModuleList | None = None
        if design.asymmetric:  # ACNet: a 3x1 and a 1x3 kernel through the centre of the 3x3 one
            half = padding
            self.rbr_asymmetric = nn.ModuleList(
                ConvBN(
                    in_channels,
                    out_channels,
                    shape,
                    stride=stride,
                    padding=pad,
                    dilation=dilation,
                    groups=groups,
                    padding_mode=padding_mode,
                )
                for shape, pad in (((kernel_size, 1), (half, 0)), ((1, kernel_size), (0, half)))
            )
        self.rbr_1x1: nn.Module | None = None
        if design.one_by_one is not None:
            # A 1x1 kernel always reads the centre tap, so it needs no padding whatever the dilation.
            make_1x1 = ConvBN if design.one_by_one == "bn" else bare_conv
            self.rbr_1x1 = make_1x1(in_channels, out_channels, 1, stride=stride, groups=groups)
        self.rbr_identity: nn.Module | None = None
        if in_channels == out_channels and stride == 1 and design.identity is not None:
            self.rbr_identity = nn.BatchNorm2d(in_channels) if design.identity == "bn" else nn.Identity()
        self.bn = nn.BatchNorm2d(out_channels) if design.post_bn else None
        self.relu_in_branches = design.relu_in_branches
        self.drop_path = float(drop_path) if self.rbr_identity is not None else 0.0

    def _deploy_conv(self, reference: Tensor | None = None) -> nn.Conv2d:
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            padding_mode=self.padding_mode,
            **factory,
        )

    def _take_geometry_of_the_convs(self) -> None:
        """Adopt the stride, padding and dilation the 3x3 branch has now, and check the others line up.

        Code written for the authors' block edits these attributes of ``rbr_dense`` / ``rbr_1x1`` in place
        (their PSPNet dilates stages 3-4 so); the fused convolution must compute what the branches compute.
        """
        dense = _conv_of(self.rbr_dense)
        stride, padding, dilation = (
            as_pair(getattr(dense, name)) for name in ("stride", "padding", "dilation")
        )
        offset = tuple(p - d * (self.kernel_size // 2) for p, d in zip(padding, dilation, strict=True))
        others = [_conv_of(branch) for branch in self.branches() if branch is not self.rbr_dense]
        for conv in others:
            if isinstance(conv, nn.Conv2d | KernelConv):
                size = as_pair(conv.kernel_size if isinstance(conv, nn.Conv2d) else conv.weight.shape[-2:])
                conv_offset = tuple(
                    p - d * (k // 2)
                    for p, d, k in zip(as_pair(conv.padding), as_pair(conv.dilation), size, strict=True)
                )
                if as_pair(conv.stride) != stride or conv_offset != offset:
                    raise ConversionError(
                        "The branches of this block no longer line up (their strides or paddings were edited "
                        "differently), so they cannot be summed into one convolution; edit the 3x3 and 1x1 "
                        "branches alike."
                    )
            elif stride != (1, 1) or offset != (0, 0):  # the identity branch reads the input as it is
                raise ConversionError(
                    "This block's identity branch cannot follow its edited 3x3 branch (stride or padding "
                    "changed), so the block cannot be converted."
                )
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def branches(self) -> Iterator[nn.Module]:
        """The trainable branches present in this block (none once deployed)."""
        if self.deploy:
            return
        yield self.rbr_dense
        if self.rbr_asymmetric is not None:
            yield from self.rbr_asymmetric
        if self.rbr_1x1 is not None:
            yield self.rbr_1x1
        if self.rbr_identity is not None:
            yield self.rbr_identity

    def _lean_layers(self, inputs: Tensor) -> tuple[Callable[[Tensor], Tensor], nn.BatchNorm2d] | None:
        """The convolution and BatchNorm of a block that is one conv -> BN -> ReLU while training (``online``,
        ``repopt``, ``plain``), when :mod:`repvgg.core.lean` can run them keeping one activation instead of
        two; None otherwise (eval mode, no autograd, tracing or compiling, hooks, SE, other branches, inside
        :func:`repvgg.core.lean.layer_by_layer`)."""
        if not (
            self.training
            and torch.is_grad_enabled()
            and lean.enabled()
            and not isinstance(inputs, torch.fx.Proxy)
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and isinstance(self.se, nn.Identity)
            and type(self.nonlinearity) is nn.ReLU
            and not has_hooks(self.nonlinearity)
            and not has_hooks(self.rbr_dense)
            and not self.relu_in_branches
            and self.rbr_asymmetric is None
            and self.rbr_1x1 is None
            and self.rbr_identity is None
        ):
            return None
        dense = self.rbr_dense
        if isinstance(dense, OnlineConv) and isinstance(self.bn, nn.BatchNorm2d):
            return dense, self.bn
        if self.bn is None and type(dense) is ConvBN and can_convolve(dense.conv):
            return partial(conv2d, conv=dense.conv), dense.bn
        return None

    def forward(self, inputs: Tensor) -> Tensor:
        if self.deploy:
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        single = self._lean_layers(inputs)
        if single is not None:  # one conv -> BN -> ReLU, keeping one activation (repvgg.core.lean)
            convolve, bn = single
            out = convolve(inputs)
            return batch_norm_relu(out, bn) if can_take(bn, out) else self.nonlinearity(bn(out))
        if self.relu_in_branches:  # the paper's non-convertible reference: ReLU outputs are kept for backward
            outputs = [
                torch.relu(branch(inputs)) for branch in self.branches() if branch is not self.rbr_identity
            ]
            out = torch.stack(outputs).sum(0)
        else:
            convolutions = (branch for branch in self.branches() if branch is not self.rbr_identity)
            out = next(convolutions)(inputs)  # a fresh tensor that no backward pass needs: safe to add into
            for branch in convolutions:
                out += branch(inputs)
        if self.drop_path and self.training:
            out = stochastic_depth(out, self.drop_path, "row", training=True)
        if self.rbr_identity is not None:
            identity = self.rbr_identity(inputs)
            out += torch.relu(identity) if self.relu_in_branches else identity
        if self.bn is not None:
            out = self.bn(out)
        return self.nonlinearity(self.se(out))

    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The 3x3 kernel and bias equal to the sum of the branches in eval mode; differentiable."""
        if self.deploy:
            return self.rbr_reparam.weight, self.rbr_reparam.bias
        if self.relu_in_branches:
            raise ConversionError(
                f"The {self.block!r} block applies a ReLU inside each branch, so its branches cannot be "
                "summed into one convolution: it is the paper's non-convertible reference; train a "
                "convertible block (e.g. repvgg) to deploy."
            )
        size = (self.kernel_size, self.kernel_size)
        reference = next(self.rbr_dense.parameters())
        kernel_bias = [
            branch_kernel_bias(
                branch,
                in_channels=self.in_channels,
                groups=self.groups,
                kernel_size=size,
                dtype=reference.dtype,
                device=reference.device,
            )
            for branch in self.branches()
        ]
        kernel = torch.stack([k for k, _ in kernel_bias]).sum(0)
        bias = torch.stack([b for _, b in kernel_bias]).sum(0)
        if self.bn is not None:
            kernel, bias = fuse_conv_bn(kernel, self.bn, bias)
        return kernel, bias

    def custom_l2(self) -> Tensor:
        """The authors' "custom L2" of the 3x3 and 1x1 kernels (to replace their plain weight decay).

        Plain L2 on the outer ring of the 3x3 kernel, plus L2 of the equivalent centre tap
        ``K3[:, :, 1, 1] * t3 + K1 * t1`` normalised by ``t3^2 + t1^2``, where ``t`` is each branch's
        BatchNorm scale ``gamma / sigma`` (detached). Add ``0.5 * weight_decay * custom_l2`` to the loss.
        """
        if self.deploy:
            raise ConversionError("custom_l2 regularises the training form; this block is already deployed.")
        if (
            not (isinstance(self.rbr_dense, ConvBN) and isinstance(self.rbr_1x1, ConvBN))
            or self.relu_in_branches
        ):
            raise ModelConfigError(
                f"The custom L2 needs a 3x3 and a 1x1 branch that both end in BatchNorm; the {self.block!r} "
                "block has not, so train it without `custom_l2` (with plain weight decay)."
            )
        k3, k1 = self.rbr_dense.conv.weight, self.rbr_1x1.conv.weight
        t3 = bn_scale_shift(self.rbr_dense.bn)[0].detach().reshape(-1, 1, 1, 1)
        t1 = bn_scale_shift(self.rbr_1x1.bn)[0].detach().reshape(-1, 1, 1, 1)
        centre = self.kernel_size // 2
        k3_centre = k3[:, :, centre : centre + 1, centre : centre + 1]
        ring = k3.square().sum() - k3_centre.square().sum()
        equivalent_centre = k3_centre * t3 + k1 * t1
        return ring + (equivalent_centre.square() / (t3.square() + t1.square())).sum()

    def reparameterize(self, *, warn_if_training_mode: bool = True) -> None:
        """Replace the branches by one equivalent convolution, in place. Does nothing if deployed."""
        if self.deploy:
            return
        if warn_if_training_mode:
            warn_if_training(self)
        self._take_geometry_of_the_convs()
        branches = ("rbr_dense", "rbr_asymmetric", "rbr_1x1", "rbr_identity", "bn")
        # A frozen block (a frozen stage's) stays frozen: the fused conv trains only if a branch did.
        trainable = any(
            p.requires_grad
            for name in branches
            if getattr(self, name) is not None
            for p in getattr(self, name).parameters()
        )
        with torch.no_grad():
            kernel, bias = self.equivalent_kernel_bias()
            fused = self._deploy_conv(reference=kernel)
            fused.weight.copy_(kernel)
            fused.bias.copy_(bias)
        fused.requires_grad_(trainable)
        for name in branches:
            delattr(self, name)
        self.rbr_reparam = fused
        self.deploy = True

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles in this block's place: its layers, spelled for TorchScript."""
        return ScriptableBlock(self)

    # -- the authors' block API, so that code written against their repvgg.py runs unchanged ------------

    def switch_to_deploy(self) -> None:
        """The authors' name for :meth:`reparameterize`."""
        self.reparameterize()

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The authors' name for :meth:`equivalent_kernel_bias`."""
        return self.equivalent_kernel_bias()

    def get_custom_L2(self) -> Tensor:
        """The authors' name for :meth:`custom_l2`."""
        return self.custom_l2()

    def extra_repr(self) -> str:
        options = ["deploy=True"] if self.deploy else []
        if self.block != "repvgg":
            options.append(f"block={self.block!r}")
        return ", ".join(options)


class ScriptableBlock(nn.Module):
    """A :class:`RepVGGBlock` (either form) as TorchScript compiles it: it shares the block's layers, every
    branch is an attribute (None when absent), and the sum is written without a generator."""

    __constants__ = ("relu_in_branches", "drop_path")

    def __init__(self, block: RepVGGBlock) -> None:
        super().__init__()
        deployed = block.deploy
        self.reparam = block.rbr_reparam if deployed else None
        self.dense = None if deployed else block.rbr_dense
        self.asymmetric = None if deployed else block.rbr_asymmetric
        self.one_by_one = None if deployed else block.rbr_1x1
        self.identity = None if deployed else block.rbr_identity
        self.bn = None if deployed else block.bn
        self.se, self.nonlinearity = block.se, block.nonlinearity
        self.relu_in_branches = not deployed and block.relu_in_branches
        self.drop_path = 0.0 if deployed else block.drop_path

    def forward(self, inputs: Tensor) -> Tensor:
        if self.reparam is not None:
            return self.nonlinearity(self.se(self.reparam(inputs)))
        outputs: list[Tensor] = []
        if self.dense is not None:
            outputs.append(self.dense(inputs))
        if self.asymmetric is not None:
            for branch in self.asymmetric:
                outputs.append(branch(inputs))
        if self.one_by_one is not None:
            outputs.append(self.one_by_one(inputs))
        out = torch.relu(outputs[0]) if self.relu_in_branches else outputs[0]
        for output in outputs[1:]:
            out = out + (torch.relu(output) if self.relu_in_branches else output)
        if self.drop_path > 0.0 and self.training:
            out = stochastic_depth(out, self.drop_path, "row", True)
        if self.identity is not None:
            identity = self.identity(inputs)
            out = out + (torch.relu(identity) if self.relu_in_branches else identity)
        if self.bn is not None:
            out = self.bn(out)
        return self.nonlinearity(self.se(out))


def _conv_of(branch: nn.Module) -> nn.Module:
    """The convolution of a branch (a ConvBN's ``conv``), or the branch itself."""
    return branch.conv if isinstance(branch, ConvBN) else branch
