"""The command line: commands run, and errors are one sentence, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from repvgg.cli import main
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


def test_demo_reports_exactness_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--image-size", "64", "--batch-size", "2", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "training form 9,108,968, deploy form 8,309,384" in out
    assert "ok at tolerance 1e-10" in out
    assert "deploy / training speed" in out


def test_errors_are_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "repvgg_z9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("repvgg demo: error: Unknown model 'repvgg_z9'") and "\n" not in err


def test_python_dash_m_and_console_script_start_without_importing_torch() -> None:
    code = "import sys, repvgg.cli; repvgg.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    help_text = subprocess.run(
        [sys.executable, "-m", "repvgg", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "models" in help_text and "demo" in help_text
