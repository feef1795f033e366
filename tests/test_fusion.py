"""The fusion math, piece by piece, against the layers it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repvgg.core.fusion import ConvBN, branch_kernel_bias, fuse_conv_bn, identity_kernel, pad_kernel
from repvgg.core.reparam import randomize_batchnorm_
from repvgg.exceptions import ConversionError

DOUBLE = {"dtype": torch.float64, "device": torch.device("cpu")}


def test_fuse_conv_bn_matches_conv_then_bn() -> None:
    branch = ConvBN(6, 8, 3, padding=1).double()
    randomize_batchnorm_(branch, seed=2).eval()
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    kernel, bias = fuse_conv_bn(branch.conv.weight, branch.bn)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=1), branch(x), rtol=1e-12, atol=1e-12)


def test_bn_without_affine_parameters_fuses() -> None:
    bn = nn.BatchNorm2d(4, affine=False).double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    kernel, bias = branch_kernel_bias(bn, in_channels=4, groups=1, kernel_size=(3, 3), **DOUBLE)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=1), bn(x), rtol=1e-12, atol=1e-12)


def test_fuse_conv_bn_carries_a_conv_bias_through_the_bn() -> None:
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=True).double()
    bn = randomize_batchnorm_(nn.BatchNorm2d(8).double(), seed=4).eval()
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    kernel, bias = fuse_conv_bn(conv.weight, bn, conv.bias)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=1), bn(conv(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_identity_branch_without_bn_is_an_identity_kernel(groups: int) -> None:
    kernel, bias = branch_kernel_bias(
        nn.Identity(), in_channels=4, groups=groups, kernel_size=(3, 3), **DOUBLE
    )
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=1, groups=groups), x)


def test_bn_without_running_statistics_is_refused() -> None:
    with pytest.raises(ConversionError, match="running statistics"):
        fuse_conv_bn(torch.ones(4, 4, 3, 3), nn.BatchNorm2d(4, track_running_stats=False))


@pytest.mark.parametrize("size", [(1, 1), (3, 1), (1, 3), (3, 3)])
def test_padded_kernel_gives_the_same_convolution(size: tuple[int, int]) -> None:
    kernel = torch.randn(5, 4, *size, dtype=torch.float64)
    x = torch.randn(1, 4, 8, 6, dtype=torch.float64)
    direct = F.conv2d(x, kernel, padding=(size[0] // 2, size[1] // 2))
    padded = F.conv2d(x, pad_kernel(kernel, (3, 3)), padding=1)
    torch.testing.assert_close(padded, direct)


def test_pad_kernel_refuses_off_centre_sizes() -> None:
    with pytest.raises(ConversionError, match="cannot be centred"):
        pad_kernel(torch.ones(1, 1, 2, 2), (3, 3))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_identity_kernel_is_identity_with_groups(groups: int) -> None:
    kernel = identity_kernel(8, groups, (3, 3), dtype=torch.float64, device=torch.device("cpu"))
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    assert kernel.shape == (8, 8 // groups, 3, 3)
    torch.testing.assert_close(F.conv2d(x, kernel, padding=1, groups=groups), x)


def test_unsupported_branch_is_named() -> None:
    with pytest.raises(ConversionError, match="ReLU"):
        branch_kernel_bias(nn.ReLU(), in_channels=4, groups=1, kernel_size=(3, 3), **DOUBLE)
