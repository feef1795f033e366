"""A run says what it does: a start-up header, a resolved config.json, a summary with its environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repvgg.engine.config import TrainConfig
from repvgg.engine.training import train
from tests.test_data import fake_fashion_mnist


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=128, test=64)


def test_a_run_prints_a_header_resolves_its_config_and_records_its_environment(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    config = TrainConfig(data_dir=str(fashion), output=str(run), epochs=2, batch_size=32, progress=False)
    summary = train(config)
    header = capsys.readouterr().out.splitlines()[:2]
    assert (
        header[0].startswith("repvgg_a0 (repvgg blocks, ")
        and "128 training / 64 validation images" in header[0]
    )
    assert "28 px, 10 classes, strides (1, 2, 2, 2, 2)" in header[0]
    assert (
        "effective batch 32, sgd lr 0.0125 (0.1 x effective batch / 256, sgd's rule)" in header[1]
        and "0 data workers" in header[1]
    )
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr"] == 0.0125 and saved["strides"] == [1, 2, 2, 2, 2] and saved["image_size"] == 28
    assert saved["device"] == "cpu" and saved["workers"] == 0, "no nulls: config.json repeats this very run"
    environment = summary["environment"]
    assert environment["cpu"]["capability"] == environment["cpu_capability"]
    assert environment["device"].endswith(environment["cpu_capability"]) or " + " in environment["device"]
    assert {"repvgg", "python", "torch", "torchvision", "device", "cpu", "command"} <= set(environment)
    assert summary["best_epoch"] in (1, 2) and summary["wall_seconds"] > 0
    again = TrainConfig.from_dict({**saved, "output": str(tmp_path / "again")})
    repeated = train(again)["train_form"]
    assert (repeated["top1"], repeated["loss"]) == (
        summary["train_form"]["top1"],
        summary["train_form"]["loss"],
    )


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_eval_writes_a_results_file_with_per_class_figures_and_a_confusion_matrix(
    fashion: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import repvgg
    from repvgg.cli import main
    from tests.helpers import small_model

    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    results = tmp_path / f"results{suffix}"
    argv = ["eval", str(checkpoint), "--data-dir", str(fashion), "--results-file", str(results)]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "top-1 per class: T-shirt/top " in out and f"wrote {results}" in out
    assert (tmp_path / "results_confusion.png").read_bytes()[:4] == b"\x89PNG"
    if suffix == ".json":
        record = json.loads(results.read_text())
        assert len(record["per_class"]) == 10 and sum(r["images"] for r in record["per_class"]) == 64
        assert sum(map(sum, record["confusion"])) == 64 and record["class_names"][0] == "T-shirt/top"
        diagonal = sum(record["confusion"][i][i] for i in range(10))
        assert abs(100 * diagonal / 64 - record["top1"]) < 1e-9, "the matrix and top-1 agree"
    else:
        lines = results.read_text().splitlines()
        assert lines[0] == "class,images,top1" and lines[1].startswith("T-shirt/top,") and len(lines) == 12
        assert lines[-1].startswith("all,64,")
    assert main(["eval", str(checkpoint), "--data-dir", str(fashion), "--results-file", "x.txt"]) == 2


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_predict_over_a_folder_and_a_glob_writes_a_results_file(
    fashion: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    import repvgg
    from repvgg.cli import main
    from repvgg.engine.data import build_data, write_sample_images
    from tests.helpers import small_model

    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    images = write_sample_images(build_data("fashion-mnist", fashion), tmp_path / "images" / "nested", 5)
    output = tmp_path / f"predictions{suffix}"
    argv = ["predict", str(checkpoint), str(tmp_path / "images"), "--topk", "2", "--output", str(output)]
    assert main(argv) == 0
    if suffix == ".csv":
        rows = list(csv.DictReader(output.open()))
        assert [row["path"] for row in rows] == [str(p) for p in images]
        assert set(rows[0]) == {"path", "class_1", "probability_1", "class_2", "probability_2"}
        assert float(rows[0]["probability_1"]) >= float(rows[0]["probability_2"])
    else:
        record = json.loads(output.read_text())
        assert (
            len(record) == 5
            and len(record[0]["top"]) == 2
            and record[0]["top"][0]["class"].startswith("class")
        )
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(tmp_path / "images" / "nested" / "*.png")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5, "a glob names the files it matches"
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(checkpoint), str(tmp_path / "empty")]) == 2
    assert main(["predict", str(checkpoint), str(images[0]), "--output", str(tmp_path / "p.txt")]) == 2


def test_the_models_table_keeps_whole_names_when_piped() -> None:
    import subprocess
    import sys

    code = "from repvgg.cli import main; main(['models'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "repvgg_b1g2" in result.stdout and "repvgg_b1g4" in result.stdout and "…" not in result.stdout


def test_predict_says_which_backend_auto_chose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    import repvgg
    from repvgg.cli import main
    from tests.helpers import small_model

    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    assert main(["predict", str(checkpoint), str(tmp_path / "x.png"), "--backend", "auto"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: backend ") and err.split()[2] in ("eager", "inductor", "onnxruntime")


def test_tensorboard_has_grouped_tags_per_step_points_and_hparams(fashion: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(TrainConfig(data_dir=str(fashion), output=str(run), epochs=1, batch_size=8, progress=False))
    epochs = EventAccumulator(str(run / "tensorboard")).Reload().Tags()["scalars"]
    assert {"train/loss", "train/top1", "train/lr", "val/top1", "val/loss"} <= set(epochs)
    steps = EventAccumulator(str(run / "tensorboard" / "steps")).Reload()
    assert [event.step for event in steps.Scalars("train/loss")] == [0, 10], "16 steps, a point every 10"
    assert list((run / "tensorboard" / "hparams").glob("events.out.tfevents.*")), "the HPARAMS tab's run"
