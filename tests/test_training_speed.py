"""The training-time fast paths compute exactly what the plain layers compute (float64), and do not crash.

``PointwiseConv2d`` (the strided 1x1 branch) picks the pixels its stride lands on and convolves them with
stride 1: the same outputs and gradients as ``nn.Conv2d``, ~1.6x faster on the CPU, and it avoids a oneDNN
fault in the channels_last weight gradient of strided 1x1 convolutions (AVX-512 CPUs, torch 2.14).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import repvgg
from repvgg.core.fusion import PointwiseConv2d, bare_conv


def _grads(output: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    return torch.autograd.grad(output, inputs, torch.randn(output.shape, dtype=output.dtype))


@settings(max_examples=40, deadline=None)
@given(
    stride=st.sampled_from([1, 2, 3, (2, 1)]),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    groups=st.sampled_from([1, 2]),
    channels_last=st.booleans(),
    bias=st.booleans(),
)
def test_pointwise_conv_equals_nn_conv2d_with_gradients(
    stride: int | tuple[int, int], height: int, width: int, groups: int, channels_last: bool, bias: bool
) -> None:
    torch.manual_seed(0)
    fast = PointwiseConv2d(4, 6, 1, stride=stride, groups=groups, bias=bias).double()
    plain = nn.Conv2d(4, 6, 1, stride=stride, groups=groups, bias=bias).double()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 4, height, width, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    expected, actual = plain(x), fast(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    wanted = (x, plain.weight) + ((plain.bias,) if bias else ())
    got = (x, fast.weight) + ((fast.bias,) if bias else ())
    for g_fast, g_plain in zip(_grads(actual, got, 1), _grads(expected, wanted, 1), strict=True):
        torch.testing.assert_close(g_fast, g_plain, rtol=0, atol=1e-12)


def test_only_unpadded_1x1_convolutions_take_the_pointwise_path() -> None:
    assert type(bare_conv(4, 4, 1, stride=2)) is PointwiseConv2d
    assert type(bare_conv(4, 4, 3, stride=2, padding=1)) is nn.Conv2d
    assert type(bare_conv(4, 4, 1, padding=1)) is nn.Conv2d
    # it is an nn.Conv2d with nn.Conv2d's keys and attributes: checkpoints and edits keep working
    conv = bare_conv(4, 8, 1, stride=2)
    assert isinstance(conv, nn.Conv2d) and conv.stride == (2, 2)
    assert set(conv.state_dict()) == {"weight"}


def test_an_edited_stride_is_followed() -> None:
    """Code written for the authors' block edits ``rbr_1x1.conv.stride`` in place; the path reads it live."""
    conv = bare_conv(2, 3, 1, stride=2).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    conv.stride = (1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight))


@pytest.mark.parametrize("block", ["repvgg", "qarepvgg"])
def test_a_strided_block_trains_with_the_gradients_of_the_plain_convolutions(block: str) -> None:
    """A stride-2 block (whose 1x1 branch takes the pointwise path) against the same block whose 1x1 branch
    is a plain ``nn.Conv2d``: outputs and every parameter's gradient equal in float64."""
    torch.manual_seed(0)
    fast = repvgg.RepVGGBlock(4, 8, stride=2, block=block).double().train()
    plain = repvgg.RepVGGBlock(4, 8, stride=2, block=block).double().train()
    plain.load_state_dict(fast.state_dict())
    one_by_one = plain.rbr_1x1.conv if hasattr(plain.rbr_1x1, "conv") else plain.rbr_1x1
    replacement = nn.Conv2d(4, 8, 1, stride=2, bias=False).double()
    replacement.load_state_dict(one_by_one.state_dict())
    if hasattr(plain.rbr_1x1, "conv"):
        plain.rbr_1x1.conv = replacement
    else:
        plain.rbr_1x1 = replacement
    x = torch.randn(5, 4, 11, 11, dtype=torch.float64)
    expected, actual = plain(x), fast(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    named_plain, named_fast = dict(plain.named_parameters()), dict(fast.named_parameters())
    names = sorted(named_fast)
    g_plain = _grads(expected, tuple(named_plain[n] for n in names), 2)
    g_fast = _grads(actual, tuple(named_fast[n] for n in names), 2)
    for name, a, b in zip(names, g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_channels_last_training_at_imagenet_sizes_does_not_crash() -> None:
    """A channels_last training step of RepVGG-A0 at 128 px: with oneDNN's strided 1x1 weight gradient it
    corrupted the heap on AVX-512 CPUs (exit -11 or -6); run apart so that a crash fails only this test."""
    script = (
        "import torch, repvgg\n"
        "torch.manual_seed(0)\n"
        "m = repvgg.create_model('repvgg_a0', num_classes=4).train().to(memory_format=torch.channels_last)\n"
        "x = torch.randn(1, 3, 128, 128).contiguous(memory_format=torch.channels_last)\n"
        "for _ in range(3):\n"
        "    m(x).sum().backward()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_a_pointwise_conv_padded_by_an_edit_convolves_as_nn_conv2d(padding_mode: str) -> None:
    fast = PointwiseConv2d(2, 3, 1, stride=2, padding=1, padding_mode=padding_mode).double()
    plain = nn.Conv2d(2, 3, 1, stride=2, padding=1, padding_mode=padding_mode).double()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 2, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-12)
