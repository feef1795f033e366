"""``repvgg ablate``: every variant with the same seeds, a table like Tables 6/7, and resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import repvgg
from repvgg.cli import main
from repvgg.exceptions import ModelConfigError
from repvgg.studies.ablation import AblationConfig, ResidualReorg, run_ablation
from tests.test_data import fake_fashion_mnist


@pytest.mark.slow
def test_a_study_trains_every_variant_and_seed_then_resumes_instead_of_starting_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = fake_fashion_mnist(tmp_path / "fashion", train=64, test=32)
    study = tmp_path / "study"
    arguments = ["ablate", "--variants", "repvgg", "plain", "relu_in_branch", "--seeds", "2", "--epochs", "1"]
    arguments += ["--data-dir", str(data), "--batch-size", "32", "--speed-batch", "4"]
    arguments += ["--output", str(study), "--no-progress"]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert out.count(": training") == 6 and "| relu_in_branch |" in out and "not convertible" in out
    report = json.loads((study / "ablation.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"repvgg", "plain", "relu_in_branch"}
    assert rows["repvgg"]["seeds"] == 2 and len(rows["repvgg"]["train_top1"]) == 2
    assert abs(rows["repvgg"]["train_top1_mean"] - rows["repvgg"]["deploy_top1_mean"]) <= 0.01
    assert rows["repvgg"]["vs_reference_mean"] == 0 and rows["repvgg"]["vs_reference_std"] == 0
    plain, ours = rows["plain"]["train_top1"], rows["repvgg"]["train_top1"]
    assert rows["plain"]["vs_reference_mean"] == pytest.approx((plain[0] - ours[0] + plain[1] - ours[1]) / 2)
    assert rows["relu_in_branch"]["deploy_top1_mean"] is None
    assert rows["relu_in_branch"]["deploy_examples_per_s"] is None
    assert rows["plain"]["train_examples_per_s"] > 0 and rows["plain"]["deploy_examples_per_s"] > 0
    first = json.loads((study / "plain" / "seed1" / "summary.json").read_text())
    assert first["block"] == "plain" and first["epochs"] == 1
    (study / "plain" / "seed1" / "summary.json").unlink()  # as if killed before the end
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "plain, seed 1: resuming" in out and ": training" not in out
    assert "| variant | top-1 as trained | per seed | vs repvgg |" in (study / "ablation.md").read_text()


def test_unknown_variants_and_seeds_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="Unknown variant 'resnet'"):
        run_ablation(AblationConfig(variants=["resnet"], output=str(tmp_path)))
    with pytest.raises(ModelConfigError, match="`seeds` must be at least 1"):
        run_ablation(AblationConfig(seeds=0, output=str(tmp_path)))


def test_residual_reorg_pairs_the_layers_into_basic_blocks_outside_the_core() -> None:
    from torchvision.models.resnet import BasicBlock

    model = ResidualReorg("repvgg_b0", num_classes=10)
    stages = [model.stage1, model.stage2, model.stage3]  # the paper's stages 2-4
    blocks = [sum(isinstance(m, BasicBlock) for m in stage.modules()) for stage in stages]
    assert blocks == [2, 3, 8], "the paper's Table 7 baseline: stages 2-4 of B0 with 2, 3, 8 blocks"
    assert not any(isinstance(m, repvgg.RepVGGBlock) for m in model.modules())
    assert model.info.form == "none" and model.info.module_type == "ResidualReorg"
    assert model.eval()(torch.randn(2, 3, 64, 48)).shape == (2, 10)
    with pytest.raises(repvgg.ConversionError, match="contains no RepVGG blocks"):
        repvgg.reparameterize(model)
    with pytest.raises(ModelConfigError, match="no SE and no grouped layers"):
        ResidualReorg("repvgg_b1g2", num_classes=10)
    with pytest.raises(TypeError):
        repvgg.create_model("repvgg_a0", layout="residual_reorg")  # not a RepVGG option any more


def test_a_one_seed_table_shows_no_spread_and_says_where_speed_was_timed() -> None:
    from repvgg.studies.ablation import _row, markdown_table

    summary = {"train_form": {"top1": 84.5}, "deploy_form": {"top1": 84.5}}
    speed = {"train_examples_per_s": 100.0, "deploy_examples_per_s": 150.0, "speed_device": "AMD EPYC"}
    row = _row("repvgg", [summary], speed)
    row["vs_reference_mean"], row["vs_reference_std"] = 0.0, None
    config = {"model": "repvgg_a0", "data": "fashion-mnist", "epochs": 1, "batch_size": 32, "seeds": 1}
    table = markdown_table({"config": {**config, "speed_batch": 8}, "rows": [row]})
    assert "+-" not in table and "one seed, so no spread is shown" in table
    assert "| repvgg | 84.50 | 84.50 | +0.00 | 84.50 | 100 | 150 |" in table
    assert "at batch 8 on AMD EPYC" in table
