"""Training faster and leaner (issue 27): the online re-parameterized block (OREPA-style, one merged kernel
and one convolution per step) and RepOpt-VGG training (a plain conv + BN with a multi-branch block's
gradients)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import repvgg
from repvgg.cli import main
from repvgg.core.blocks import RepVGGBlock
from repvgg.core.fusion import OnlineConv
from repvgg.core.reparam import randomize_batchnorm_, start_merged_from
from repvgg.core.repopt import (
    BranchScales,
    gradient_multiplier,
    initialize_like_csla,
    rule_scales,
    searched_scales,
)
from repvgg.engine.config import TrainConfig, load_run_config
from repvgg.engine.distributed import DistContext
from repvgg.engine.recipe import repopt_multipliers
from repvgg.engine.training import ClassificationRun, train
from repvgg.exceptions import ModelConfigError, TrainingError
from repvgg.io.checkpoints import read_checkpoint
from repvgg.studies.ablation import VARIANTS
from tests.test_data import fake_fashion_mnist

SMALL = {"batch_size": 16, "progress": False, "seed": 0, "epochs": 1, "train_subset": 64, "val_subset": 32}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=128, test=64)


class Convolutions(TorchDispatchMode):
    """Counts the convolutions (forward and backward) that run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.forward = self.backward = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.convolution.default:
            self.forward += 1
        if func is torch.ops.aten.convolution_backward.default:
            self.backward += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("block", "forward"), [("online", 1), ("repopt", 1), ("repvgg", 2)])
def test_a_training_step_runs_one_convolution_per_block(block: str, forward: int) -> None:
    layer = RepVGGBlock(8, 8, block=block).train()
    images = torch.randn(2, 8, 6, 6)
    with Convolutions() as counted:
        layer(images).sum().backward()
    assert (counted.forward, counted.backward) == (forward, forward)


def test_the_online_block_is_differentiable_and_converts_exactly() -> None:
    torch.manual_seed(0)
    block = RepVGGBlock(6, 6, block="online").double()
    conv = block.rbr_dense
    assert isinstance(conv, OnlineConv) and conv.scale_identity is not None
    with torch.no_grad():
        for scale in (conv.scale_dense, conv.scale_1x1, conv.scale_identity):
            scale.uniform_(0.5, 1.5)
    randomize_batchnorm_(block)
    block(torch.randn(3, 6, 7, 5, dtype=torch.float64)).square().sum().backward()
    for parameter in (conv.weight, conv.weight_1x1, conv.scale_dense, conv.scale_1x1, conv.scale_identity):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    report = repvgg.verify_equivalence(block.eval(), input_shape=(2, 6, 9, 7))
    assert report.passed and report.max_abs_error < 1e-12
    downsampling = RepVGGBlock(6, 12, stride=2, block="online").rbr_dense
    assert downsampling.scale_identity is None, "no identity where the shape changes"


def online_conv(in_channels: int, out_channels: int, stride: int, groups: int) -> OnlineConv:
    conv = OnlineConv(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups).double()
    with torch.no_grad():
        for parameter in conv.parameters():
            parameter.uniform_(-1.0, 1.0)
    return conv


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "stride", "groups"),
    [(4, 4, 1, 1), (4, 4, 1, 2), (6, 6, 1, 3), (4, 6, 2, 1), (4, 8, 1, 2), (6, 6, 2, 1)],
)
def test_the_merged_kernel_step_has_autograd_s_gradients_in_float64(
    in_channels: int, out_channels: int, stride: int, groups: int
) -> None:
    """The block's own backward pass (kernel recomputed, gradients in closed form) against autograd through
    :meth:`OnlineConv.kernel`, for every parameter and the input."""
    torch.manual_seed(0)
    conv = online_conv(in_channels, out_channels, stride, groups)
    images = torch.randn(2, in_channels, 7, 6, dtype=torch.float64, requires_grad=True)
    wrt = [images, *conv.parameters()]
    output = conv(images)
    reference = torch.nn.functional.conv2d(images, conv.kernel(), None, stride, 1, 1, groups)
    upstream = torch.randn_like(output)
    assert torch.equal(output, reference)
    for ours, theirs in zip(
        torch.autograd.grad(output, wrt, upstream), torch.autograd.grad(reference, wrt, upstream), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_the_merged_kernel_step_respects_frozen_parameters_and_autocast() -> None:
    torch.manual_seed(0)
    conv = online_conv(4, 4, 1, 1).float()
    conv.weight_1x1.requires_grad_(False)
    conv.scale_identity.requires_grad_(False)
    images = torch.randn(2, 4, 5, 5)  # the first layer: no gradient for the input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = conv(images)
        reference = torch.nn.functional.conv2d(images, conv.kernel(), None, 1, 1)
    assert output.dtype == reference.dtype == torch.bfloat16
    assert torch.equal(output, reference)
    trained = [conv.weight, conv.scale_dense, conv.scale_1x1]
    upstream = torch.randn_like(output)
    ours = torch.autograd.grad(output, trained, upstream)
    theirs = torch.autograd.grad(reference, trained, upstream)
    for mine, autograd in zip(ours, theirs, strict=True):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, autograd, rtol=1e-2, atol=1e-2)


def test_the_online_block_keeps_no_merged_kernel_for_the_backward_pass() -> None:
    """What makes it lean: only the input (and the parameters themselves) are saved between the passes."""
    block = RepVGGBlock(8, 8, block="online").train()
    images = torch.randn(2, 8, 6, 6)
    own = {parameter.data_ptr() for parameter in block.parameters()}
    kernels = []

    def pack(saved: torch.Tensor) -> torch.Tensor:
        if saved.dim() == 4 and saved.shape == block.rbr_dense.weight.shape and saved.data_ptr() not in own:
            kernels.append(saved)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        block(images).sum().backward()
    assert not kernels, "a merged kernel was kept for the backward pass"


def test_a_whole_online_network_converts_exactly_and_deploys_like_any_other() -> None:
    model = randomize_batchnorm_(repvgg.create_model("repvgg_a0", num_classes=7, block="online").double())
    assert repvgg.verify_equivalence(model.eval()).max_abs_error < 1e-10
    deployed = repvgg.reparameterize(model)
    plain = repvgg.reparameterize(repvgg.create_model("repvgg_a0", num_classes=7).eval())
    assert deployed.state_dict().keys() == plain.state_dict().keys(), "the same deploy form as every design"


def test_one_repopt_step_is_the_multi_branch_block_s_step_in_float64() -> None:
    """The constant-scale multi-branch block (an online block with frozen scales) and the plain conv + BN
    with RepOpt's gradient multipliers take the same SGD steps (momentum included), to rounding."""
    torch.manual_seed(0)
    multi = RepVGGBlock(6, 6, block="online").double().train()
    branches = multi.rbr_dense
    with torch.no_grad():
        for scale in (branches.scale_dense, branches.scale_1x1, branches.scale_identity):
            scale.uniform_(0.5, 1.5)
            scale.requires_grad_(False)
    plain = RepVGGBlock(6, 6, block="repopt").double().train()
    with torch.no_grad():
        plain.rbr_dense.conv.weight.copy_(branches.kernel())
    plain.rbr_dense.bn.load_state_dict(multi.bn.state_dict())
    multiplier = gradient_multiplier(plain, BranchScales.of(branches))
    trainable = [p for p in multi.parameters() if p.requires_grad]
    optimizers = [torch.optim.SGD(ps, lr=0.1, momentum=0.9) for ps in (trainable, list(plain.parameters()))]
    images = torch.randn(4, 6, 9, 7, dtype=torch.float64)
    target = torch.randn(4, 6, 9, 7, dtype=torch.float64)
    for _ in range(3):
        for block, optimizer in zip((multi, plain), optimizers, strict=True):
            optimizer.zero_grad()
            (block(images) * target).sum().backward()
        plain.rbr_dense.conv.weight.grad.mul_(multiplier)
        for optimizer in optimizers:
            optimizer.step()
        torch.testing.assert_close(plain.rbr_dense.conv.weight, branches.kernel(), rtol=0, atol=1e-12)
        torch.testing.assert_close(plain(images), multi(images), rtol=0, atol=1e-11)
    centre_extra = multiplier[:, :, 1, 1] - multiplier[:, :, 0, 0]
    torch.testing.assert_close(centre_extra, branches.scale_1x1.square().reshape(-1, 1).expand(-1, 6))


def test_repopt_starts_from_the_multi_branch_block_s_kernel() -> None:
    torch.manual_seed(0)
    block = RepVGGBlock(16, 16, block="repopt")
    initialize_like_csla(block, BranchScales.unit(block))
    kernel = block.rbr_dense.conv.weight.detach()
    diagonal = kernel[range(16), range(16), 1, 1]
    assert (diagonal - 1).abs().mean() < 0.3, "the identity's 1 on the centre taps of the diagonal"
    assert kernel[:, :, 0, 0].abs().max() < 0.2, "a fresh 3x3 kernel elsewhere"
    with pytest.raises(ModelConfigError, match="belong to the training form of `repopt` blocks"):
        gradient_multiplier(RepVGGBlock(4, 4), BranchScales.unit(RepVGGBlock(4, 4)))


@pytest.mark.parametrize("block", ["online", "repopt"])
def test_each_design_trains_from_scratch_and_both_forms_agree(
    fashion: Path, tmp_path: Path, block: str
) -> None:
    config = TrainConfig.from_dict(
        {**SMALL, "data_dir": str(fashion), "output": str(tmp_path / "r"), "block": block}
    )
    summary = train(config)
    assert summary["forms_agree"] and summary["block"] == block
    trained = repvgg.load_checkpoint(tmp_path / "r" / "model_train.safetensors")
    assert trained.block == block


def test_a_repopt_run_applies_the_multipliers_of_all_its_blocks(fashion: Path, tmp_path: Path) -> None:
    config = TrainConfig.from_dict(
        {**SMALL, "data_dir": str(fashion), "output": str(tmp_path / "r"), "block": "repopt"}
    )
    run = ClassificationRun(config, DistContext())
    blocks = [b for b in run.model.modules() if isinstance(b, RepVGGBlock)]
    assert len(run.trainer.gradient_multipliers) == len(blocks) == 22
    by_weight = {id(weight): multiplier for weight, multiplier in run.trainer.gradient_multipliers}
    fourth = by_weight[id(run.model.stage2[3].rbr_dense.conv.weight)]  # the paper's constants by default
    assert fourth[0, 0, 0, 0].item() == pytest.approx(2 / 3) and fourth[0, 0, 1, 1].item() == pytest.approx(
        4 / 3
    )
    plain = ClassificationRun(
        TrainConfig.from_dict(
            {**SMALL, "data_dir": str(fashion), "output": str(tmp_path / "p"), "block": "plain"}
        ),
        DistContext(),
    )
    assert plain.trainer.gradient_multipliers == [], "the plain design (Table 6) takes its own gradients"


def test_the_paper_s_constant_scales_shrink_the_conv_branches_down_a_stage() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10, block="repopt")
    paper, unit = rule_scales(model, "paper"), rule_scales(model, "unit")
    assert len(paper) == len(unit) == 22
    for name, identity, conv_scale in [
        ("stage0", None, 1.0),
        ("stage2.0", None, 1.0),
        ("stage2.3", 1.0, (2 / 3) ** 0.5),
    ]:
        scales = paper[name]
        assert scales.dense.tolist() == pytest.approx([conv_scale] * len(scales.dense))
        assert torch.equal(scales.one_by_one, scales.dense)
        if identity is None:
            assert scales.identity is None, "no identity where the shape changes"
        else:
            assert torch.equal(scales.identity, torch.ones_like(scales.dense))
    assert all(bool((s.dense == 1).all()) for s in unit.values())
    with pytest.raises(ModelConfigError, match="Unknown branch-scale rule 'sqrt'"):
        rule_scales(model, "sqrt")


def test_a_repopt_run_saved_before_the_scales_were_recorded_resumes_with_unit_scales(tmp_path: Path) -> None:
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"block": "repopt", "epochs": 2}))
    assert load_run_config(saved, saved_run=True)["repopt_scales"] == "unit"
    assert "repopt_scales" not in load_run_config(saved), "a new run from a config file takes the default"
    saved.write_text(json.dumps({"block": "repvgg", "epochs": 2}))
    assert "repopt_scales" not in load_run_config(saved, saved_run=True)


def online_with_learned_scales() -> torch.nn.Module:
    """An online A0 whose branch scales are far from their initial 1, as a search could leave them."""
    online = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1, block="online")
    with torch.no_grad():
        for name, parameter in online.named_parameters():
            if ".scale_" in name:
                parameter.uniform_(0.2, 2.0)
    return online


def test_repopt_takes_the_scales_an_online_network_learned(tmp_path: Path) -> None:
    """RepOpt-VGG's hyper-search: the online block's learned scales, by block name, become the constants."""
    online = online_with_learned_scales()
    repopt = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1, block="repopt")
    scales = searched_scales(repopt, online.state_dict())
    blocks = dict(online.named_modules())
    multipliers = repopt_multipliers(repopt, initialize=True, scales=scales)
    assert len(scales) == len(multipliers) == 22
    for (name, block), (weight, multiplier) in zip(
        ((n, b) for n, b in repopt.named_modules() if isinstance(b, RepVGGBlock)), multipliers, strict=True
    ):
        expected = gradient_multiplier(block, BranchScales.of(blocks[name].rbr_dense))
        assert weight is block.rbr_dense.conv.weight
        torch.testing.assert_close(multiplier, expected, rtol=0, atol=0)
    assert not torch.equal(multipliers[0][1], torch.ones_like(multipliers[0][1]))


@pytest.mark.parametrize(
    ("model", "block", "problem"),
    [("repvgg_a0", "repvgg", "no stage0.rbr_dense.scale_dense"), ("repvgg_a1", "online", "another shape")],
)
def test_scales_from_anything_but_an_online_run_of_the_model_are_refused(
    model: str, block: str, problem: str
) -> None:
    other = repvgg.create_model(model, num_classes=10, block=block)
    repopt = repvgg.create_model("repvgg_a0", num_classes=10, block="repopt")
    with pytest.raises(ModelConfigError, match=problem):
        searched_scales(repopt, other.state_dict())


def test_a_repopt_run_with_searched_scales_keeps_them_when_resumed(fashion: Path, tmp_path: Path) -> None:
    base = {**SMALL, "data_dir": str(fashion)}
    searched = repvgg.save_checkpoint(online_with_learned_scales(), tmp_path / "search.safetensors")
    run = {**base, "output": str(tmp_path / "r"), "block": "repopt", "repopt_scales": str(searched)}
    train(TrainConfig.from_dict(run))
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    model = repvgg.create_model(
        "repvgg_a0", num_classes=10, in_chans=1, strides=[1, 2, 2, 2, 2], block="repopt"
    )
    expected = repopt_multipliers(
        model, initialize=False, scales=searched_scales(model, read_checkpoint(searched).state_dict)
    )
    for saved, (_, multiplier) in zip(state["gradient_multipliers"], expected, strict=True):
        torch.testing.assert_close(saved, multiplier, rtol=0, atol=0)
    resumed = ClassificationRun(TrainConfig.from_dict({**run, "epochs": 2}), DistContext())
    with torch.no_grad():
        for _, multiplier in resumed.trainer.gradient_multipliers:
            multiplier.fill_(3.0)  # whatever the run would compute now, the saved ones are the run's own
    resumed.resume()
    for saved, (_, multiplier) in zip(
        state["gradient_multipliers"], resumed.trainer.gradient_multipliers, strict=True
    ):
        torch.testing.assert_close(multiplier, saved, rtol=0, atol=0)
    with pytest.raises(TrainingError, match="`repopt_scales` sets the gradient multipliers"):
        TrainConfig.from_dict({**run, "block": "online"}).validate()


@pytest.mark.parametrize("block", ["online", "repopt"])
def test_fine_tuning_starts_from_a_repvgg_checkpoint_computing_the_same_function(
    fashion: Path, tmp_path: Path, block: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1, strides=[1, 2, 2, 2, 2])
    randomize_batchnorm_(source)
    checkpoint = repvgg.save_checkpoint(source, tmp_path / "repvgg.safetensors")
    target = repvgg.create_model(
        "repvgg_a0", num_classes=10, in_chans=1, strides=[1, 2, 2, 2, 2], block=block
    )
    start_merged_from(source.double(), target.double())
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(target.eval()(images), source.eval()(images), rtol=0, atol=1e-10)
    arguments = ["train", "--block", block, "--init", str(checkpoint), "--data-dir", str(fashion)]
    arguments += ["--epochs", "1", "--train-subset", "32", "--val-subset", "16", "--batch-size", "16"]
    assert main([*arguments, "--no-progress", "--output", str(tmp_path / "run")]) == 0
    assert f"its repvgg blocks merged into {block} blocks" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["forms_agree"]


def test_designs_that_merge_their_branches_refuse_drop_path(fashion: Path, tmp_path: Path) -> None:
    for block in ("online", "repopt"):
        config = TrainConfig.from_dict(
            {**SMALL, "data_dir": str(fashion), "output": str(tmp_path), "block": block}
        )
        config.drop_path = 0.1
        with pytest.raises(TrainingError, match="no separate identity branch"):
            config.validate()


def test_ablate_compares_the_new_designs_on_the_same_seeds(fashion: Path, tmp_path: Path) -> None:
    assert {"online", "repopt"} <= set(VARIANTS)
    arguments = ["ablate", "--variants", "repvgg", "online", "repopt", "--seeds", "1", "--epochs", "1"]
    arguments += ["--train-subset", "32", "--val-subset", "16", "--batch-size", "16", "--speed-batch", "4"]
    assert (
        main([*arguments, "--data-dir", str(fashion), "--no-progress", "--output", str(tmp_path / "a")]) == 0
    )
    table = (tmp_path / "a" / "ablation.md").read_text()
    for variant in ("online", "repopt"):
        assert f"| {variant}" in table, table
