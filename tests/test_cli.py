"""The command line: commands run, and errors are one sentence, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from repvgg.cli import main
from tests.test_data import fake_fashion_mnist
from tests.test_models import SPEC_COUNTS


def test_models_table_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == list(SPEC_COUNTS)
    for row in rows:
        train, deploy, gmacs = SPEC_COUNTS[row["model"]]
        assert (row["train_params"], row["deploy_params"]) == (train, deploy)
        assert row["gmacs_224"] == pytest.approx(gmacs, rel=0.005)
    assert rows[0]["paper_top1"] == 72.41


def test_models_table_for_terminal_and_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert "9,108,968" in capsys.readouterr().out
    assert main(["models", "--format", "markdown"]) == 0
    assert "| repvgg_d2se | 133,334,836 | 120,387,572 | 32.830 |" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_converts_and_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = fake_fashion_mnist(tmp_path / "fashion", train=256, test=32)
    arguments = ["demo", "--data-dir", str(data), "--train-subset", "256", "--epochs", "1"]
    arguments += ["--output", str(tmp_path / "demo"), "--batch-size", "8", "--repeats", "2"]
    arguments += ["--images", "3", "--backend", "onnxruntime"]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "checked in float64:" in out and "ok at tolerance 1e-10" in out and "agree)" in out
    assert "verify the saved pair" in out and "ok at tolerance 1e-05" in out
    assert "export ONNX: wrote" in out and "onnxruntime vs PyTorch" in out
    assert "predict 3 test images" in out and " right" in out
    assert "deploy form, onnxruntime" in out and "deploy / training speed" in out
    for name in ("model_train.safetensors", "model_deploy.safetensors", "model.onnx"):
        assert (tmp_path / "demo" / name).is_file()
    assert len(list((tmp_path / "demo" / "images").glob("*.png"))) == 3


def test_errors_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = fake_fashion_mnist(tmp_path / "fashion", train=64, test=32)
    assert main(["train", "--model", "repvgg_z9", "--data-dir", str(data), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("repvgg train: error: Unknown model 'repvgg_z9'") and "\n" not in err


def test_cli_choices_name_the_library_s_blocks_and_backends() -> None:
    from repvgg.blocks import BLOCK_DESIGNS
    from repvgg.cli import BACKEND_CHOICES, BLOCK_CHOICES
    from repvgg.inference import BACKEND_CHOICES as LIBRARY_BACKENDS

    assert tuple(BLOCK_DESIGNS) == BLOCK_CHOICES and tuple(LIBRARY_BACKENDS) == BACKEND_CHOICES


def test_python_dash_m_and_console_script_start_without_importing_torch() -> None:
    code = "import sys, repvgg.cli; repvgg.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    help_text = subprocess.run(
        [sys.executable, "-m", "repvgg", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(command in help_text for command in ("models", "demo", "train", "eval"))
