"""The GPU suite (benchmarks/gpu_suite.sh) runs end to end with --smoke on the CPU, so it cannot rot between
the sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_suite_runs_every_section_in_smoke_mode(tmp_path: Path) -> None:
    output = tmp_path / "out"
    finished = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    record = json.loads((output / "suite.json").read_text())
    sections = record["sections"]
    assert list(sections) == ["exactness", "speed", "training", "ddp", "table6"]
    assert all(section["status"] == "ok" for section in sections.values()), sections
    assert sections["exactness"]["max_rel_error"]["repvgg_a0"] <= 1e-10
    assert sections["speed"]["half_precision"]["repvgg_a0"]["bf16"] > 0
    assert {row["implementation"] for row in sections["training"]["rows"]} == {
        "ours",
        "online",
        "repopt",
        "timm",
    }
    assert sections["ddp"]["forms_agree"] is True and sections["ddp"]["processes"] == 1
    assert set(sections["table6"]["rows"]) == {"repvgg", "plain"}
    written = sorted(path.name for path in output.iterdir())
    assert written == [
        "bench.json",
        "bench.md",
        "figure1.png",
        "log.txt",
        "suite.json",
        "suite.md",
        "table6.md",
    ]
    assert len(written) <= 8, "a lent GPU machine sends back at most eight files"
    assert "smoke run on the CPU" in (output / "suite.md").read_text()


def test_without_a_gpu_the_suite_says_how_to_test_it_instead(tmp_path: Path) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    finished = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert finished.returncode == 2 and "run with --smoke" in finished.stdout
