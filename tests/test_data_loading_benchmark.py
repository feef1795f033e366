"""benchmarks/data_loading.py runs end to end at a tiny size and prints its table, CPU and command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_data_loading_benchmark_prints_a_row_for_each_source() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "data_loading.py"), "--smoke"]
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    row = r"^\| (imagefolder|shards) \| 0 \| ([\d.]+) \| ([\d.]+) \| \d+-\d+ \| [\d.]+ \|$"
    rows = re.findall(row, finished.stdout, re.M)
    assert [source for source, *_ in rows] == ["imagefolder", "shards"], finished.stdout
    assert all(float(rate) > 0 and rate == per_core for _, rate, per_core in rows)  # one core with 0 workers
    assert (
        "| source | workers | images/s | images/s per core | range of the runs | CPU ms per image |"
        in finished.stdout
    )
    capability = torch.backends.cpu.get_cpu_capability()
    assert re.search(rf"^CPU: .+, {re.escape(capability)} \(", finished.stdout, re.M), finished.stdout
    assert "Command: `python benchmarks/data_loading.py --smoke`" in finished.stdout
