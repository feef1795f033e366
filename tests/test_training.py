"""Training: the recipe's pieces, a full small run, exact resumption after SIGKILL, and clear stops."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import repvgg
from repvgg.cli import _run_config, build_parser, main
from repvgg.core.info import PREPROCESSING_PRESETS
from repvgg.engine.config import TrainConfig
from repvgg.engine.data import build_data, write_sample_images
from repvgg.engine.distributed import DistContext
from repvgg.engine.recipe import LRSchedule, parameter_groups
from repvgg.engine.training import ClassificationRun, Trainer, train
from repvgg.exceptions import CheckpointError, DataError, TrainingError
from repvgg.io.checkpoints import read_checkpoint
from repvgg.studies.ablation import ResidualReorg, build_network, load_trained
from tests.test_data import fake_fashion_mnist, make_image_folder

SMALL = {"train_subset": None, "val_subset": None, "batch_size": 32, "progress": False, "seed": 0}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=128, test=64)


def small_config(data_dir: Path, output: Path, **overrides: object) -> TrainConfig:
    values = {**SMALL, "data_dir": str(data_dir), "output": str(output), "epochs": 1, **overrides}
    return TrainConfig.from_dict(values)


def test_a_run_writes_its_record_and_both_forms_agree(fashion: Path, tmp_path: Path) -> None:
    summary = train(small_config(fashion, tmp_path / "run", epochs=2))
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "last.pt", "best_train.safetensors", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "train_top1", "train_images_per_s", "val_top1", "val_top5", "lr"} <= set(records[0])
    assert summary["forms_agree"] and summary["top1_difference"] <= 0.01
    assert summary["processes"] == 1 and summary["ranks_hold_identical_weights"]
    deployed = repvgg.load_checkpoint(run / "model_deploy.safetensors")
    assert deployed.deploy and deployed.class_names[0] == "T-shirt/top" and deployed.in_chans == 1
    assert deployed.strides == (1, 2, 2, 2, 2), "strides adapted to 28 px"
    assert deployed.preprocessing == PREPROCESSING_PRESETS["fashion-mnist"], "predict needs it"
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_options_of_the_recipe_run_together(fashion: Path, tmp_path: Path) -> None:
    summary = train(
        small_config(
            fashion,
            tmp_path / "run",
            ema_decay=0.99,
            label_smoothing=0.1,
            mixup=0.2,
            augment="autoaugment",
            amp="bf16",
            channels_last=True,
            grad_checkpointing=True,
            custom_l2=True,
            nesterov=True,
            warmup_epochs=0.5,
        )
    )
    assert summary["weights"] == "ema" and summary["forms_agree"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "ema_val_top1" in record


def test_qarepvgg_trains_and_converts_through_the_cli(fashion: Path, tmp_path: Path) -> None:
    run = tmp_path / "qa"
    arguments = ["train", "--block", "qarepvgg", "--data-dir", str(fashion), "--epochs", "1"]
    arguments += ["--batch-size", "32", "--no-progress", "--output", str(run)]
    assert main(arguments) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["forms_agree"]
    trained = repvgg.load_checkpoint(run / "model_train.safetensors")
    assert trained.block == "qarepvgg" and not trained.deploy
    with pytest.raises(TrainingError, match="drop `custom_l2`"):
        small_config(fashion, tmp_path / "x", block="qarepvgg", custom_l2=True).validate()


@pytest.mark.parametrize(("block", "layout"), [("relu_in_branch", "repvgg"), ("repvgg", "residual_reorg")])
def test_designs_without_a_plain_form_train_and_say_so(
    fashion: Path, tmp_path: Path, block: str, layout: str
) -> None:
    config = small_config(fashion, tmp_path / "run", block=block, layout=layout)
    summary = train(config, build_network=build_network)
    assert summary["deploy_form"] is None and summary["forms_agree"] is None
    assert (tmp_path / "run" / "model_train.safetensors").is_file()
    assert not (tmp_path / "run" / "model_deploy.safetensors").exists()
    loaded = load_trained(tmp_path / "run" / "model_train.safetensors", config)
    if layout == "repvgg":
        assert loaded.block == block
    else:
        assert isinstance(loaded, ResidualReorg) and loaded.info.class_names is not None
        with pytest.raises(CheckpointError, match="neither a RepVGG nor a PSPNet over one"):
            repvgg.load_checkpoint(tmp_path / "run" / "model_train.safetensors")


def test_learning_rate_scales_with_the_batch_and_follows_warmup_then_cosine(
    fashion: Path, tmp_path: Path
) -> None:
    trainer = ClassificationRun(small_config(fashion, tmp_path, batch_size=64), DistContext())
    assert trainer.lr == pytest.approx(0.1 * 64 / 256)
    schedule = LRSchedule(total_steps=110, warmup_steps=10)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5) and schedule(110) == pytest.approx(0.0)
    assert all(schedule(s) >= schedule(s + 1) for s in range(10, 110))


def test_weight_decay_follows_the_authors_exclusions() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10)
    decay, no_decay = parameter_groups(model, 1e-4, custom_l2=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    assert "stage1.1.rbr_identity.weight" in decayed  # the identity BN weight keeps its decay
    assert "stage1.1.rbr_dense.conv.weight" in decayed and "linear.weight" in decayed
    assert not any(n.endswith("bias") or ".bn." in n for n in decayed)
    decay_l2, _ = parameter_groups(model, 1e-4, custom_l2=True)
    decayed_l2 = {names[id(p)] for p in decay_l2["params"]}
    assert not any(n.endswith(("rbr_dense.conv.weight", "rbr_1x1.conv.weight")) for n in decayed_l2)


def test_custom_l2_is_the_authors_formula() -> None:
    block = repvgg.randomize_batchnorm_(repvgg.RepVGGBlock(4, 6).double(), seed=2)
    k3, k1 = block.rbr_dense.conv.weight, block.rbr_1x1.conv.weight
    bn3, bn1 = block.rbr_dense.bn, block.rbr_1x1.bn
    t3 = (bn3.weight / (bn3.running_var + bn3.eps).sqrt()).reshape(-1, 1, 1, 1)
    t1 = (bn1.weight / (bn1.running_var + bn1.eps).sqrt()).reshape(-1, 1, 1, 1)
    ring = (k3**2).sum() - (k3[:, :, 1:2, 1:2] ** 2).sum()
    centre = k3[:, :, 1:2, 1:2] * t3 + k1 * t1
    expected = ring + (centre**2 / (t3**2 + t1**2)).sum()
    torch.testing.assert_close(block.custom_l2(), expected)
    block.custom_l2().backward()
    assert bn3.weight.grad is None, "the BN scales are detached"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fashion: Path, tmp_path: Path) -> None:
    class Poisoned(Trainer):
        def _train_epoch(self, epoch: int) -> dict[str, float]:
            if epoch == 2:
                with torch.no_grad():
                    self.model.linear.weight.fill_(float("nan"))
            return super()._train_epoch(epoch)

    trainer = ClassificationRun(small_config(fashion, tmp_path, epochs=3), DistContext())
    trainer.trainer.__class__ = Poisoned
    with pytest.raises(
        TrainingError, match=r"loss became nan at epoch 2, step 1, .* kept \(.*last\.pt \(epoch 1\)\)"
    ):
        trainer.run()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and torch.isfinite(state["model"]["linear.weight"]).all()


def test_checkpoint_for_other_classes_is_refused_or_finetuned(fashion: Path, tmp_path: Path) -> None:
    imagenet = repvgg.create_model("repvgg_a0", num_classes=1000, in_chans=1)
    path = repvgg.save_checkpoint(imagenet, tmp_path / "in1k.safetensors")
    with pytest.raises(
        CheckpointError, match=r"1000 classes but the model 10: replace its classifier head \(`finetune`\)"
    ):
        ClassificationRun(small_config(fashion, tmp_path / "a", init=str(path)), DistContext())
    trainer = ClassificationRun(
        small_config(fashion, tmp_path / "b", init=str(path), finetune=True), DistContext()
    )
    assert trainer.model.num_classes == 10
    torch.testing.assert_close(
        trainer.model.stage1[0].rbr_dense.conv.weight, imagenet.stage1[0].rbr_dense.conv.weight
    )
    deployed = repvgg.save_checkpoint(repvgg.reparameterize(imagenet.eval()), tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match=r"deploy-form model .* start from the training-form"):
        ClassificationRun(
            small_config(fashion, tmp_path / "c", init=str(deployed), finetune=True), DistContext()
        )


def test_too_small_a_training_set_is_explained(fashion: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than one global batch"):
        ClassificationRun(small_config(fashion, tmp_path, train_subset=10), DistContext())


def test_unreadable_training_image_is_named_or_skipped(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", per_class=8, bad=True)
    options = {"data": "imagefolder", "image_size": 32, "batch_size": 4, "workers": 0}
    with pytest.raises(DataError, match=r"Cannot read image .*broken\.png .*`skip_bad_images`"):
        train(small_config(folder, tmp_path / "a", **options))
    (folder / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    summary = train(small_config(folder, tmp_path / "b", skip_bad_images=True, **options))
    last = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["bad_images_skipped"] == last["bad_images"] == 2, "one in train/, one in val/, once each"


def run_cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "repvgg", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_sigkilled_run_resumes_to_exactly_the_uninterrupted_weights(fashion: Path, tmp_path: Path) -> None:
    common = [
        "train",
        "--data-dir",
        str(fashion),
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--seed",
        "5",
        "--ema",
        "0.9",
        "--warmup-epochs",
        "1",
        "--no-progress",
    ]
    straight = run_cli(*common, "--output", "straight", cwd=tmp_path)
    interrupted = run_cli(*common, "--output", "interrupted", cwd=tmp_path)
    state = tmp_path / "interrupted" / "last.pt"
    deadline = time.monotonic() + 240
    while not state.exists():
        assert interrupted.poll() is None, interrupted.communicate()[0]
        assert time.monotonic() < deadline, "the run wrote no checkpoint"
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    epochs_done = torch.load(state, weights_only=True)["epoch"]
    assert epochs_done < 4, "the kill must land before the end of the run"
    resumed = run_cli(*common, "--output", "interrupted", "--resume", cwd=tmp_path)
    for process in (straight, resumed):
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 0, output
    expected = load_file(tmp_path / "straight" / "model_train.safetensors")
    actual = load_file(tmp_path / "interrupted" / "model_train.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_resume_without_a_run_is_explained(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--data-dir", str(fashion), "--output", str(tmp_path / "none"), "--resume"])
    assert code == 2
    assert "Nothing to resume" in capsys.readouterr().err


def test_config_file_repeats_a_run_and_flags_override_it(tmp_path: Path) -> None:
    saved = TrainConfig(model="repvgg_a1", epochs=7, lr=0.3, output=str(tmp_path / "first"))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(saved.__dict__))
    args = build_parser().parse_args(
        ["train", "--config", str(config_file), "--epochs", "9", "--output", "second"]
    )
    config, resume = _run_config(args, TrainConfig)
    assert (config.model, config.lr, config.epochs, config.output) == ("repvgg_a1", 0.3, 9, "second")
    assert not resume
    default = _run_config(build_parser().parse_args(["train"]), TrainConfig)[0]
    assert default == TrainConfig(output="runs/repvgg_a0-fashion-mnist")
    config_file.write_text(json.dumps({"epochs": 2, "colour": "red"}))
    with pytest.raises(TrainingError, match="Unknown configuration keys colour"):
        _run_config(build_parser().parse_args(["train", "--config", str(config_file)]), TrainConfig)


def test_eval_command_reads_any_checkpoint(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = train(small_config(fashion, tmp_path / "run"))
    capsys.readouterr()
    for name in ("model_train.safetensors", "model_deploy.safetensors"):
        assert main(["eval", str(tmp_path / "run" / name), "--data-dir", str(fashion)]) == 0
        assert f"top-1 {summary['deploy_form']['top1']:.2f}%" in capsys.readouterr().out
    other = repvgg.save_checkpoint(
        repvgg.create_model("a0", num_classes=5, in_chans=1), tmp_path / "x.safetensors"
    )
    assert main(["eval", str(other), "--data-dir", str(fashion)]) == 2
    assert "has 5 classes but fashion-mnist has 10" in capsys.readouterr().err
    assert not math.isnan(summary["train_form"]["images_per_s"])


def test_resuming_with_another_model_is_explained(fashion: Path, tmp_path: Path) -> None:
    ClassificationRun(small_config(fashion, tmp_path), DistContext()).run()
    with pytest.raises(TrainingError, match=r"already holds a run .* \(`resume`\), .* \(`overwrite`\)"):
        train(small_config(fashion, tmp_path))
    other = ClassificationRun(small_config(fashion, tmp_path, model="repvgg_b0"), DistContext())
    with pytest.raises(TrainingError, match="does not fit the configured model"):
        other.resume()


def test_last_pt_carries_the_run_s_record_for_convert_eval_and_predict(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run with non-default strides: its last.pt must rebuild that model, not the paper's strides."""
    run = tmp_path / "run"
    summary = train(small_config(fashion, run, strides=[1, 1, 2, 2, 2]))
    state = run / "last.pt"
    checkpoint = read_checkpoint(state)
    assert checkpoint.info == repvgg.load_checkpoint(run / "model_train.safetensors").info
    assert checkpoint.config["strides"] == [1, 1, 2, 2, 2] and checkpoint.class_names[0] == "T-shirt/top"
    model = repvgg.load_checkpoint(state)
    assert model.strides == (1, 1, 2, 2, 2) and model.preprocessing == PREPROCESSING_PRESETS["fashion-mnist"]
    assert main(["convert", str(state), str(tmp_path / "deploy.safetensors")]) == 0
    assert repvgg.load_checkpoint(tmp_path / "deploy.safetensors").strides == (1, 1, 2, 2, 2)
    assert main(["eval", str(state), "--data-dir", str(fashion)]) == 0
    assert f"top-1 {summary['train_form']['top1']:.2f}%" in capsys.readouterr().out, "the run's own score"
    image = write_sample_images(build_data("fashion-mnist", fashion), tmp_path / "images", 1)
    predictions, _ = repvgg.predict(state, image, topk=1)
    assert predictions[0].top[0][0] in model.class_names
