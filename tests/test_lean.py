"""One kept activation per conv -> BN -> ReLU block (repvgg.core.lean): the ``online``, ``repopt`` and
``plain`` blocks keep the convolution's output for the backward pass and recompute the ReLU's output from
it, with the outputs, gradients and running statistics of their layers."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import repvgg
from repvgg.core.blocks import RepVGGBlock
from repvgg.core.lean import layer_by_layer
from repvgg.core.reparam import randomize_batchnorm_

LEAN_DESIGNS = ("online", "repopt", "plain")
# (in, out, stride, groups, dilation) of three chained blocks.
GEOMETRIES = {
    "stride-and-channels": [(4, 6, 2, 1, 1), (6, 6, 1, 1, 1), (6, 6, 1, 1, 1)],
    "groups": [(4, 4, 1, 2, 1), (4, 8, 1, 2, 1), (8, 8, 1, 4, 1)],
    "dilation": [(4, 4, 1, 1, 2), (4, 4, 1, 1, 1), (4, 6, 2, 2, 2)],
}


def chain(design: str, geometry: str, **bn_options: object) -> nn.Sequential:
    blocks = [
        RepVGGBlock(i, o, stride=s, groups=g, dilation=d, block=design)
        for i, o, s, g, d in GEOMETRIES[geometry]
    ]
    for bn in (m for block in blocks for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
        for name, value in bn_options.items():
            setattr(bn, name, value)
    return randomize_batchnorm_(nn.Sequential(*blocks)).double().train()


def train_step(model: nn.Module, images: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    images = images.clone().requires_grad_()
    output = model(images)
    output.backward(upstream)
    assert images.grad is not None
    return output.detach(), images.grad, *(p.grad for p in model.parameters())


def compare(
    lean: nn.Module,
    layers: nn.Module,
    step: Callable[[nn.Module], tuple[torch.Tensor, ...]],
    tolerance: float = 1e-12,
) -> None:
    ours = step(lean)
    with layer_by_layer():
        theirs = step(layers)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine is not None and reference is not None
        torch.testing.assert_close(mine, reference, rtol=tolerance, atol=tolerance)
    for mine, reference in zip(lean.buffers(), layers.buffers(), strict=True):  # running statistics
        torch.testing.assert_close(mine, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("design", LEAN_DESIGNS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_lean_chain_computes_what_its_layers_compute_in_float64(
    design: str, geometry: str, momentum: float | None
) -> None:
    """Outputs, input and parameter gradients, running statistics (exponential and cumulative averages) and
    the batch counter, over two steps (the second starts from the first's statistics)."""
    torch.manual_seed(0)
    lean = chain(design, geometry, momentum=momentum)
    layers = copy.deepcopy(lean)
    images = torch.randn(3, GEOMETRIES[geometry][0][0], 9, 8, dtype=torch.float64)
    upstream = torch.randn_like(layers(images.clone()).detach())
    layers.load_state_dict(lean.state_dict())  # that call moved the statistics
    for _ in range(2):
        compare(lean, layers, lambda model: train_step(model, images, upstream))


def saved_activations(model: nn.Module, images: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """The distinct storages (by address, with a shape) that autograd keeps between the passes of one step,
    parameters excepted."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, tuple[int, ...]] = {}

    def pack(saved: torch.Tensor) -> torch.Tensor:
        address = saved.untyped_storage().data_ptr()
        if saved.dim() == 4 and address not in parameters:
            kept[address] = tuple(saved.shape)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        model(images).sum().backward()
    return kept


@pytest.mark.parametrize("design", LEAN_DESIGNS)
def test_a_lean_chain_keeps_its_input_and_each_convolution_s_output_and_nothing_else(design: str) -> None:
    torch.manual_seed(0)
    model = chain(design, "stride-and-channels").float()
    images = torch.randn(2, 4, 10, 10)
    outputs = [(2, 6, 5, 5)] * 3  # a conv output per block; the ReLU outputs are recomputed
    assert sorted(saved_activations(model, images).values()) == sorted([(2, 4, 10, 10), *outputs])
    with layer_by_layer():
        assert len(saved_activations(model, images)) == 1 + 2 * 3, "the layers keep the ReLU outputs too"


class Doubled(nn.Module):
    """Doubles its input, in place or not."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.mul_(2) if self.inplace else inputs * 2


def test_an_activation_modified_in_place_between_blocks_is_kept_as_it_is() -> None:
    """After ``z.mul_(2)`` the recipe of ``z`` no longer holds, so the next convolution keeps ``z`` itself:
    the gradients are those of the out-of-place network (which the layers' path needs: its ReLU keeps z)."""
    torch.manual_seed(0)
    first, second = chain("repopt", "stride-and-channels")[:2]
    lean = nn.Sequential(first, Doubled(inplace=True), second)
    layers = nn.Sequential(*copy.deepcopy([first, Doubled(inplace=False), second]))
    images = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    upstream = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    compare(lean, layers, lambda model: train_step(model, images, upstream))


def test_hooks_on_the_block_s_layers_still_run_while_training() -> None:
    block = RepVGGBlock(4, 4, block="repopt").train()
    seen: list[str] = []
    block.rbr_dense.bn.register_forward_hook(lambda *args: seen.append("bn"))
    block.nonlinearity.register_forward_hook(lambda *args: seen.append("relu"))
    block.rbr_dense.conv.register_full_backward_hook(lambda *args: seen.append("conv backward"))
    block(torch.randn(2, 4, 5, 5, requires_grad=True)).sum().backward()
    assert seen == ["bn", "relu", "conv backward"]


@pytest.mark.parametrize("design", LEAN_DESIGNS)
def test_under_autocast_a_lean_chain_keeps_one_half_precision_activation_per_block(design: str) -> None:
    """bf16 autocast (float32 parameters and statistics): the layers' outputs, gradients and statistics (to
    bf16's rounding: the recomputed BN output may differ from ATen's by one step of bf16), keeping the
    input and each convolution's bf16 output."""
    torch.manual_seed(0)
    lean = chain(design, "groups").float()
    layers = copy.deepcopy(lean)
    images = torch.randn(2, 4, 6, 6)
    upstream = torch.randn(2, 8, 6, 6)

    def bf16_step(model: nn.Module) -> tuple[torch.Tensor, ...]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(images)
        assert output.dtype == torch.bfloat16
        output.float().backward(upstream)
        return (output.detach().float(), *(p.grad for p in model.parameters()))

    compare(lean, layers, bf16_step, tolerance=5e-2)  # a few of bf16's steps (1/128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = saved_activations(lean, images)
    assert sorted(kept.values()) == sorted([(2, 4, 6, 6), (2, 4, 6, 6), (2, 8, 6, 6), (2, 8, 6, 6)])


@pytest.mark.parametrize("design", LEAN_DESIGNS)
def test_tracing_and_eval_take_the_layers_own_path(design: str) -> None:
    torch.manual_seed(0)
    lean = chain(design, "groups").float()
    layers = copy.deepcopy(lean)
    images = torch.randn(2, 4, 6, 6)
    traced = torch.jit.trace(copy.deepcopy(lean), images, check_trace=False)
    assert "batch_norm" in str(traced.inlined_graph), "tracing records the layers, not a Python function"
    lean.eval()
    torch.testing.assert_close(lean(images), layers.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize("design", ["repopt", "plain"])
def test_fx_traces_the_training_form_of_a_lean_block_as_its_layers(design: str) -> None:
    block = RepVGGBlock(4, 4, block=design).train()
    graph_module = torch.fx.symbolic_trace(block)
    called = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
    assert called == ["rbr_dense.conv", "rbr_dense.bn", "se", "nonlinearity"]


def test_a_lean_network_trains_and_converts_exactly() -> None:
    """A whole RepOpt A0 after a few lean steps: its deploy form computes what its training form does."""
    torch.manual_seed(0)
    model = repvgg.create_model("repvgg_a0", num_classes=5, block="repopt", in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.randint(0, 5, (4,))).backward()
        optimizer.step()
    report = repvgg.verify_equivalence(model.double().eval(), input_shape=(2, 1, 28, 28))
    assert report.max_rel_error < 1e-10, report  # relative: 3 steps on 4 images give eval outputs ~1e12


def test_a_differentiated_backward_pass_runs_layer_by_layer() -> None:
    """A gradient penalty (``create_graph=True``) needs the layers' twice-differentiable path; the lean
    functions refuse it in one sentence instead of computing something else."""
    block = RepVGGBlock(4, 4, block="repopt").double().train()
    images = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)

    def penalty() -> torch.Tensor:
        (grad,) = torch.autograd.grad(block(images).square().sum(), images, create_graph=True)
        return grad.square().sum()

    with pytest.raises(RuntimeError, match="once_differentiable"):
        penalty().backward()
    with layer_by_layer():
        penalty().backward()
    assert block.rbr_dense.conv.weight.grad is not None


@pytest.mark.parametrize(
    ("name", "value"), [("affine", False), ("track_running_stats", False), ("momentum", None)]
)
def test_a_batchnorm_the_lean_path_cannot_take_trains_as_its_layers(name: str, value: object) -> None:
    """BatchNorm without affine parameters or running statistics (built so, as a user may) runs as a module;
    a cumulative average (momentum None) takes the lean path: both compute what the layers do."""
    torch.manual_seed(0)
    blocks = [RepVGGBlock(4, 4, block="repopt"), RepVGGBlock(4, 4, block="repopt")]
    for block in blocks:
        block.rbr_dense.bn = nn.BatchNorm2d(4, **{name: value})
    lean = nn.Sequential(*blocks).double().train()
    layers = copy.deepcopy(lean)
    images = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    upstream = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    compare(lean, layers, lambda model: train_step(model, images, upstream))
