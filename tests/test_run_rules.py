"""One set of run-folder rules for ``repvgg train`` and ``repvgg train-seg``: resuming takes the run's own
settings, a run stopped before its first checkpoint can be continued, ``config.json`` holds every resolved
value (an absolute ``data_dir``) so that ``--config`` repeats the run from any folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from repvgg.cli import main
from repvgg.engine.training import Trainer
from repvgg.exceptions import DataError
from tests.test_data import fake_fashion_mnist

pytestmark = pytest.mark.slow

SMALL = {  # command -> a small run's options (the subsets are part of the run)
    "train": ["--batch-size", "16", "--train-subset", "32", "--val-subset", "16"],
    "train-seg": ["--batch-size", "4", "--head-channels", "16", "--train-subset", "8", "--val-subset", "4"],
}
WEIGHTS = {"train": "model_train.safetensors", "train-seg": "pspnet_train.safetensors"}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=64, test=32)


def _run(command: str, fashion: Path, output: Path, *more: str) -> int:
    return main([command, "--data-dir", str(fashion), "--output", str(output), "--no-progress", *more])


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("command", ["train", "train-seg"])
def test_resume_after_a_subset_run_takes_the_run_s_own_settings(
    command: str, fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train-seg once refused to resume a subset run "for changing --train-subset" that nobody gave."""
    run = tmp_path / "run"
    assert _run(command, fashion, run, *SMALL[command], "--epochs", "1") == 0
    assert main([command, "--output", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert _epochs(run) == [1, 2]
    saved = json.loads((run / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["train_subset"] == int(
        SMALL[command][SMALL[command].index("--train-subset") + 1]
    )
    capsys.readouterr()
    assert main([command, "--output", str(run), "--resume", "--epochs", "3", "--seed", "7"]) == 2
    assert "Resuming cannot change --seed (0 -> 7)" in capsys.readouterr().err
    assert main([command, "--output", str(run), "--resume", "--config", str(run / "config.json")]) == 2
    assert "drop --config" in capsys.readouterr().err
    assert main([command, "--output", str(run), "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "train-seg"])
def test_a_run_stopped_before_its_first_checkpoint_is_continued_by_resume(
    command: str,
    fashion: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped in epoch 1 (an unreadable image, a kill): config.json but no last.pt. Starting again says
    "continue it (--resume)"; resuming once said "start without --resume". Now the advice works."""
    run = tmp_path / "run"
    with monkeypatch.context() as patch:

        def stop(self: Trainer, epoch: int) -> None:
            raise DataError("An image could not be read.")

        patch.setattr(Trainer, "_train_epoch", stop)
        assert _run(command, fashion, run, *SMALL[command], "--epochs", "1") == 2
    assert (run / "config.json").is_file() and not (run / "last.pt").exists()
    capsys.readouterr()
    assert _run(command, fashion, run, *SMALL[command], "--epochs", "1") == 2
    assert "continue it (--resume)" in capsys.readouterr().err
    assert main([command, "--output", str(run), "--resume", "--no-progress"]) == 0
    assert (
        "stopped before its first checkpoint (no last.pt): starting it from epoch 1"
        in capsys.readouterr().out
    )
    assert _epochs(run) == [1] and (run / WEIGHTS[command]).is_file()
    fresh = tmp_path / "fresh"
    assert _run(command, fashion, fresh, *SMALL[command], "--epochs", "1") == 0
    resumed, uninterrupted = load_file(run / WEIGHTS[command]), load_file(fresh / WEIGHTS[command])
    assert all((resumed[k] == uninterrupted[k]).all() for k in uninterrupted), "the same run, from epoch 1"


def test_a_folder_with_results_but_no_checkpoint_is_not_restarted_by_resume(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert _run("train", fashion, run, *SMALL["train"], "--epochs", "1") == 0
    (run / "last.pt").unlink()
    capsys.readouterr()
    assert main(["train", "--output", str(run), "--resume", "--epochs", "2"]) == 2
    error = capsys.readouterr().err
    assert "holds metrics of 1 epoch(s), summary.json" in error and "(--overwrite, without --resume)" in error
    assert _run("train", fashion, run, *SMALL["train"], "--epochs", "1", "--overwrite") == 0


@pytest.mark.parametrize("command", ["train", "train-seg"])
def test_config_json_is_resolved_and_repeats_the_run_from_another_folder(
    command: str,
    fashion: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(first)
    relative = Path("..") / ".." / fashion.relative_to(fashion.parents[1])
    (first / relative.parent).mkdir(parents=True, exist_ok=True)
    link = first / "data"
    link.symlink_to(fashion)
    assert main([command, "--data-dir", "data", "--output", "run", *SMALL[command], "--epochs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = "PSPNet over repvgg_a0 (" if command == "train-seg" else "repvgg_a0 (repvgg blocks, "
    assert (out[0].startswith(header) and "8 training / 4 validation images" in out[0]) or command == "train"
    assert "writing to run" in out[1]
    saved = json.loads((first / "run" / "config.json").read_text())
    resolved = ["data_dir", "image_size", "device"] + (["num_classes"] if command == "train-seg" else [])
    assert all(saved[k] is not None for k in resolved), "no nulls: config.json repeats this very run"
    assert saved["data_dir"] == str(first / "data") and Path(saved["data_dir"]).is_absolute()
    if command == "train-seg":
        assert (saved["num_classes"], saved["image_size"], saved["device"]) == (11, 56, "cpu")
    monkeypatch.chdir(elsewhere)
    again = ["--config", str(first / "run" / "config.json"), "--output", "again", "--no-progress"]
    assert main([command, *again]) == 0
    before, repeated = (
        load_file(first / "run" / WEIGHTS[command]),
        load_file(elsewhere / "again" / WEIGHTS[command]),
    )
    assert all((before[k] == repeated[k]).all() for k in before), "--config repeats the very run"


@pytest.mark.parametrize(("option", "value"), [("--image-size", "64"), ("--num-classes", "5")])
def test_train_seg_refuses_settings_fashion_mnist_seg_cannot_take(
    option: str, value: str, fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run("train-seg", fashion, tmp_path / "run", *SMALL["train-seg"], option, value) == 2
    assert f"drop {option}" in capsys.readouterr().err and not list((tmp_path / "run").glob("*"))


# ---------------------------------------------------------------------------------------------------------
# One writer per run folder.


@pytest.mark.parametrize("command", ["train", "train-seg", "ablate"])
def test_a_second_process_on_a_run_folder_is_refused_in_one_sentence(
    command: str, fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs on one folder once both exited 0, the folder mixing them (one's weights, the other's config,
    every epoch twice in metrics.jsonl). The lock is the kernel's: held here, refused there."""
    from repvgg.io.files import LOCK_FILE, folder_lock

    run = tmp_path / "run"
    options = SMALL["train-seg" if command == "train-seg" else "train"]
    if command == "ablate":
        options = [*options, "--seeds", "1", "--variants", "repvgg"]
    with folder_lock(run, "the test") as held:
        assert (held / LOCK_FILE).read_text().startswith(f"process {os.getpid()} (")
        assert _run(command, fashion, run, *options, "--epochs", "1") == 2
        assert {p.name for p in run.iterdir()} == {LOCK_FILE}, "the refused run wrote nothing"
    error = capsys.readouterr().err.strip()
    assert (
        error.startswith(f"repvgg {command}: error: {run} is being written by process ") and "\n" not in error
    )
    assert not run.exists(), "the holder made the folder and wrote nothing in it: it is gone with the lock"
    assert _run(command, fashion, run, *options, "--epochs", "1") == 0, "released with its holder"


def test_two_runs_started_together_leave_one_whole_run(fashion: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "repvgg", "train", "--data-dir", str(fashion), "--output", str(run)]
    argv += [*SMALL["train"], "--epochs", "2", "--no-progress"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (out, err, second.stderr)
    refused = second.stderr if second.returncode == 2 else err
    assert "is being written by process " in refused and "Traceback" not in refused
    assert _epochs(run) == [1, 2], "every epoch once: one run wrote the folder"
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_a_lock_left_by_a_dead_process_blocks_nobody(fashion: Path, tmp_path: Path) -> None:
    from repvgg.io.files import LOCK_FILE

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("process 999999 (repvgg train)")  # killed: its kernel lock went with it
    assert _run("train", fashion, run, *SMALL["train"], "--epochs", "1") == 0
    assert _epochs(run) == [1]


def test_a_refused_run_leaves_no_folder_behind(fashion: Path, tmp_path: Path) -> None:
    run = tmp_path / "new"
    assert main(["train", "--output", str(run), "--resume"]) == 2  # nothing to resume there
    assert not run.exists()


@pytest.mark.parametrize("command", ["train", "train-seg"])
def test_resume_with_fewer_epochs_than_trained_is_refused_and_changes_nothing(
    command: str, fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--resume --epochs 1`` after 2 epochs once rewrote config.json and summary.json to say 1 epoch while
    the weights and metrics.jsonl held 2."""
    import hashlib

    run = tmp_path / "run"
    assert _run(command, fashion, run, *SMALL[command], "--epochs", "2") == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([command, "--output", str(run), "--resume", "--epochs", "1", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "has trained 2 epochs already; --epochs 1 would leave" in error and "at least 2" in error
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}
    assert after == before
