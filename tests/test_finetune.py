"""Fine-tuning from pretrained weights: the authors', timm's and mmpretrain's ImageNet files start a run on
another dataset, which says what it loaded and what it replaced; frozen stages stay as loaded, and the head
can learn faster than the body."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import repvgg
from repvgg.cli import main
from repvgg.engine.recipe import parameter_groups
from repvgg.exceptions import CheckpointError, ModelConfigError, RepVGGWarning
from tests.test_data import fake_fashion_mnist

FORMATS = {"official": "the authors'", "timm": "timm's", "mmpretrain": "mmpretrain's"}


@pytest.fixture(scope="module")
def imagenet() -> repvgg.RepVGG:
    """Stands for an ImageNet-trained A0: 1000 classes, RGB input, BatchNorm statistics not the defaults."""
    model = repvgg.create_model("repvgg_a0")
    repvgg.randomize_batchnorm_(model)
    return model


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=64, test=32)


@pytest.mark.parametrize("source_format", sorted(FORMATS))
def test_a_pretrained_file_of_another_code_base_starts_a_fine_tuning_run(
    source_format: str,
    imagenet: repvgg.RepVGG,
    fashion: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pretrained = tmp_path / "RepVGG-A0-train.pth"
    torch.save(repvgg.convert_state_dict(imagenet.state_dict(), to=source_format), pretrained)
    run = tmp_path / "run"
    argv = f"train --data-dir {fashion} --output {run} --epochs 1 --batch-size 32 --no-progress"
    argv += f" --pretrained {pretrained} --finetune --freeze-stages 1 --head-lr-mult 10 --lr 0.05"
    assert main(argv.split()) == 0
    out = capsys.readouterr().out
    assert (
        f"loaded 349 tensors of repvgg_a0 ({FORMATS[source_format]} format) from {pretrained}; replaced "
        "its 1000-class head by a new 10-class one; adapted its stem from 3 to 1 input channels; stages 0-1 "
        "frozen; head learning rate x10"
    ) in out
    tuned = repvgg.load_checkpoint(run / "model_train.safetensors")
    loaded, trained = imagenet.state_dict(), tuned.state_dict()
    frozen = [k for k in trained if k.startswith("stage1.")]
    assert all(torch.equal(trained[k], loaded[k]) for k in frozen), "frozen weights and statistics kept"
    stem = "stage0.rbr_dense.conv.weight"
    torch.testing.assert_close(trained[stem], loaded[stem].sum(1, keepdim=True))  # grey: summed over RGB
    assert not torch.equal(
        trained["stage3.0.rbr_dense.conv.weight"], loaded["stage3.0.rbr_dense.conv.weight"]
    )
    assert tuned.num_classes == 10 and tuned.class_names is not None


def test_create_model_starts_from_a_file_as_timm_does(imagenet: repvgg.RepVGG, tmp_path: Path) -> None:
    path = repvgg.save_checkpoint(imagenet, tmp_path / "a0.safetensors")
    same = repvgg.create_model("repvgg_a0", pretrained=path)
    expected = imagenet.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in same.state_dict().items())
    with pytest.warns(RepVGGWarning, match="replaced its 1000-class head by a new 5-class one"):
        five = repvgg.create_model("repvgg_a0", pretrained=path, num_classes=5)
    assert five.num_classes == 5 and torch.equal(
        five.stage4[0].rbr_dense.conv.weight, imagenet.stage4[0].rbr_dense.conv.weight
    )
    assert repvgg.create_model("repvgg_a0", pretrained=False).num_classes == 1000
    with pytest.raises(CheckpointError, match="downloads no weights: give `pretrained` the path"):
        repvgg.create_model("repvgg_a0", pretrained=True)
    with pytest.raises(CheckpointError, match=r"No checkpoint file at .*nothing\.pth"):
        repvgg.create_model("repvgg_a0", pretrained=tmp_path / "nothing.pth")


def test_frozen_stages_keep_their_weights_and_statistics_while_training() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=4, frozen_stages=1).train()
    assert not any(p.requires_grad for p in [*model.stage0.parameters(), *model.stage1.parameters()])
    assert all(p.requires_grad for p in model.stage2.parameters())
    assert not model.stage1.training and model.stage2.training
    before = model.stage1[0].rbr_dense.bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.stage1[0].rbr_dense.bn.running_mean, before)
    with pytest.raises(ModelConfigError, match="frozen_stages must be -1 \\(none\\) or 0-4, got 5"):
        repvgg.create_model("repvgg_a0", frozen_stages=5)


def test_the_head_gets_its_own_learning_rate_and_frozen_parameters_none() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=4, frozen_stages=0)
    groups = parameter_groups(model, 1e-4, custom_l2=False, head_lr=1.0)
    head = [g for g in groups if g.get("lr") == 1.0]
    assert sum(len(g["params"]) for g in head) == 2  # linear.weight (decayed) and linear.bias (not)
    assert {g["weight_decay"] for g in head} == {1e-4, 0.0}
    listed = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in listed for p in model.stage0.parameters())
    assert len(parameter_groups(model, 1e-4, custom_l2=False)) == 2, "no multiplier: the two groups as before"
