"""RepVGG blocks: conversion is exact for every shape of block (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repvgg import ModelConfigError, RepVGGBlock, SEBlock
from repvgg.core.designs import BLOCK_DESIGNS
from repvgg.core.fusion import ConvBN, IdentityPlusConv
from repvgg.core.reparam import randomize_batchnorm_
from repvgg.exceptions import ConversionError
from tests.helpers import relative_error

CONVERTIBLE = [name for name, design in BLOCK_DESIGNS.items() if design.convertible]


@st.composite
def block_settings(draw: st.DrawFn) -> dict[str, int | bool]:
    groups = draw(st.sampled_from([1, 2, 4]))
    in_channels = groups * draw(st.integers(1, 6))
    same = draw(st.booleans())  # makes the identity branch likely
    out_channels = in_channels if same else 16 * draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "stride": stride,
        "groups": groups,
        "dilation": draw(st.sampled_from([1, 2])),
        "use_se": draw(st.booleans()),
        "block": draw(st.sampled_from(CONVERTIBLE)),
    }


@settings(max_examples=60, deadline=None)
@given(options=block_settings(), height=st.integers(5, 13), width=st.integers(5, 13), seed=st.integers(0, 99))
def test_reparameterized_block_is_exact(
    options: dict[str, int | bool], height: int, width: int, seed: int
) -> None:
    block = RepVGGBlock(kernel_size=3, **options).double()  # type: ignore[arg-type]
    randomize_batchnorm_(block, seed=seed).eval()
    design = BLOCK_DESIGNS[str(options["block"])]
    has_identity = options["in_channels"] == options["out_channels"] and options["stride"] == 1
    assert (block.rbr_identity is not None) == (has_identity and design.identity is not None)
    assert (block.bn is not None) == design.post_bn
    x = torch.randn(2, int(options["in_channels"]), height, width, dtype=torch.float64)
    expected = block(x)
    block.reparameterize()
    assert block.deploy and not hasattr(block, "rbr_dense") and not hasattr(block, "rbr_identity")
    assert block.rbr_reparam.groups == options["groups"]
    assert block.rbr_reparam.dilation == (options["dilation"],) * 2
    assert relative_error(block(x), expected) <= 1e-12


def test_equivalent_kernel_bias_is_differentiable() -> None:
    block = randomize_batchnorm_(RepVGGBlock(8, 8, groups=2).double(), seed=3)
    kernel, bias = block.equivalent_kernel_bias()
    (kernel.square().sum() + bias.square().sum()).backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_deployed_block_reports_its_conv_and_converts_once() -> None:
    block = RepVGGBlock(4, 4).eval()
    block.reparameterize()
    weight = block.rbr_reparam.weight
    block.reparameterize()
    assert block.rbr_reparam.weight is weight
    kernel, bias = block.equivalent_kernel_bias()
    assert kernel is weight and bias is block.rbr_reparam.bias


def test_conversion_keeps_dtype_and_device() -> None:
    block = RepVGGBlock(4, 6, stride=2).to(torch.float64).eval()
    block.reparameterize()
    assert block.rbr_reparam.weight.dtype == torch.float64


def test_se_block_works_on_non_square_input() -> None:
    se = SEBlock(32, internal_neurons=2).double()
    x = torch.randn(2, 32, 7, 19, dtype=torch.float64)
    gate = torch.sigmoid(se.up(torch.relu(se.down(x.mean(dim=(2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), x * gate)


@pytest.mark.parametrize("padding", [0, 2])
def test_padding_that_misaligns_branches_is_refused(padding: int) -> None:
    with pytest.raises(ModelConfigError, match="line up"):
        RepVGGBlock(4, 4, 3, padding=padding)


def test_groups_must_divide_channels() -> None:
    with pytest.raises(ModelConfigError, match="groups=4"):
        RepVGGBlock(6, 6, groups=4)


def test_block_in_deploy_form_has_only_conv_relu() -> None:
    block = RepVGGBlock(4, 4, deploy=True)
    kinds = {type(m) for m in block.modules()} - {RepVGGBlock}
    assert kinds == {nn.Conv2d, nn.ReLU, nn.Identity}


def test_qarepvgg_block_has_bare_1x1_and_identity_and_one_bn_after_the_sum() -> None:
    block = RepVGGBlock(8, 8, block="qarepvgg")
    assert isinstance(block.rbr_dense, ConvBN)
    assert isinstance(block.rbr_1x1, nn.Conv2d) and block.rbr_1x1.bias is None
    assert type(block.rbr_identity) is nn.Identity and isinstance(block.bn, nn.BatchNorm2d)
    assert "block='qarepvgg'" in repr(block)
    x = torch.randn(2, 8, 6, 6)
    block.eval()
    expected = block.nonlinearity(block.bn(block.rbr_dense(x) + block.rbr_1x1(x) + x))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize(
    ("block", "branches"),
    [
        ("no_identity", 2),
        ("no_1x1", 2),
        ("plain", 1),
        ("post_add_bn", 3),
        ("identity_no_bn", 3),
        ("acb", 3),
        ("diracnet", 1),
        ("trivial", 1),
        ("relu_in_branch", 3),
    ],
)
def test_ablation_blocks_have_their_branches(block: str, branches: int) -> None:
    assert len(list(RepVGGBlock(8, 8, block=block).branches())) == branches


def test_acb_branches_are_3x1_and_1x3_through_the_centre() -> None:
    block = RepVGGBlock(4, 8, stride=2, dilation=2, block="acb")
    assert block.rbr_asymmetric is not None
    assert [b.conv.kernel_size for b in block.rbr_asymmetric] == [(3, 1), (1, 3)]
    assert [b.conv.padding for b in block.rbr_asymmetric] == [(2, 0), (0, 2)]


def test_trivial_and_dirac_kernels_hold_the_identity() -> None:
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    trivial = IdentityPlusConv(6, 6, 3, padding=1, normalized=False).double()
    expected = x + torch.nn.functional.conv2d(x, trivial.weight, padding=1)
    torch.testing.assert_close(trivial(x), expected)
    dirac = IdentityPlusConv(6, 6, 3, padding=1, normalized=True).double()
    learned = dirac.kernel() - torch.nn.functional.pad(
        torch.eye(6, dtype=torch.float64)[:, :, None, None], [1] * 4
    )
    norms = learned.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, dirac.beta.detach().abs())
    assert not IdentityPlusConv(6, 8, 3, padding=1, normalized=True).has_identity


def test_relu_in_branch_block_trains_but_refuses_to_convert() -> None:
    block = RepVGGBlock(8, 8, block="relu_in_branch").eval()
    x = torch.randn(1, 8, 5, 5)
    expected = sum(torch.relu(b(x)) for b in (block.rbr_dense, block.rbr_1x1, block.rbr_identity))
    torch.testing.assert_close(block(x), torch.relu(expected))
    with pytest.raises(ConversionError, match="cannot be summed into one convolution"):
        block.reparameterize()


def test_unknown_block_and_custom_l2_on_bare_branches_are_refused() -> None:
    with pytest.raises(ModelConfigError, match=r"Unknown block 'qa'.*qarepvgg"):
        RepVGGBlock(8, 8, block="qa")
    with pytest.raises(ModelConfigError, match="plain weight decay"):
        RepVGGBlock(8, 8, block="qarepvgg").custom_l2()
    with pytest.raises(ConversionError, match="already deployed"):
        RepVGGBlock(8, 8, deploy=True).custom_l2()
