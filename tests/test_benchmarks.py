"""Benchmark scripts behind BENCHMARKS.md run end to end at tiny sizes, so that their figures can be measured
again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_throughput_times_every_implementation_and_reports_ratios(tmp_path: Path) -> None:
    record = tmp_path / "train.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--batch-size", "4"]
    command += ["--image-size", "16", "--steps", "1", "--repeats", "1", "--json", str(record)]
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result = json.loads(record.read_text())
    names = {"ours-channels_last", "ours-contiguous", "timm-contiguous", "timm-channels_last"}
    assert set(result["results"]) | set(result["crashes"]) == names
    assert all(row["images_per_s"] > 0 for row in result["results"].values())
    assert "ours-channels_last / timm-contiguous" in result["ratios"]
    assert result["cpu"]["capability"]  # every record names the CPU it was measured on
    assert "| ours-channels_last |" in finished.stdout


@pytest.mark.slow
def test_train_throughput_times_the_online_and_repopt_designs_beside_timm(tmp_path: Path) -> None:
    record = tmp_path / "train.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--batch-size", "4"]
    command += ["--image-size", "16", "--steps", "1", "--repeats", "1", "--json", str(record)]
    command += ["--implementations", "online-channels_last", "repopt-channels_last", "timm-contiguous"]
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result = json.loads(record.read_text())
    assert set(result["ratios"]) == {
        "online-channels_last / timm-contiguous",
        "repopt-channels_last / timm-contiguous",
    }
    kept = {name: row["saved_mib"] for name, row in result["results"].items()}  # allocator-independent
    assert kept["online-channels_last"] == kept["repopt-channels_last"] < 0.5 * kept["timm-contiguous"], kept


def test_seed_statistics_pairs_seeds_and_tests_non_inferiority(tmp_path: Path) -> None:
    """The paired t-statistics behind RESULTS.md's top-1 comparison, on made-up runs whose figures are known:
    differences +1, +2, +3 (mean 2, standard error 1/sqrt(3)), t quantiles of 2 degrees of freedom."""
    for design, top1 in {"base": [70.0, 71.0, 72.0, 60.0], "new": [71.0, 73.0, 75.0]}.items():
        for seed, value in enumerate(top1):
            folder = tmp_path / design / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps({"train_form": {"top1": value}}))
    record = tmp_path / "stats.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "seed_statistics.py"), "--baseline", "base"]
    command += ["--design", "base", str(tmp_path / "base"), "--design", "new", str(tmp_path / "new")]
    finished = subprocess.run([*command, "--json", str(record)], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(record.read_text())["differences"]["new"]
    error = 1 / 3**0.5
    assert result["seeds"] == 3 and result["mean"] == pytest.approx(2.0)
    assert result["ci95_low"] == pytest.approx(2 - 4.303 * error, abs=1e-3)  # t(0.975, 2) = 4.303
    assert result["one_sided_95_lower"] == pytest.approx(2 - 2.920 * error, abs=1e-3)  # t(0.95, 2) = 2.920
    assert result["non_inferior"] and result["higher_in"] == 3


def test_peak_tensor_memory_counts_new_storages_while_they_live() -> None:
    """benchmarks/train_throughput.py's allocator-free peak: 1 MiB and 2 MiB alive together, then freed; views
    and in-place updates of an existing tensor add nothing."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location(
        "train_throughput", ROOT / "benchmarks" / "train_throughput.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    existing = torch.zeros(2**20, dtype=torch.uint8)

    def step() -> None:
        first = torch.ones(2**18)  # 1 MiB of float32
        second = torch.ones(2**19)  # 2 MiB
        existing.add_(1).view(2, -1)[0].fill_(3)
        del first, second
        torch.ones(2**18)  # 1 MiB again, after both are gone

    assert module.peak_tensor_mib(step) == pytest.approx(3.0)


def test_lean_activation_ab_times_both_paths() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "lean_activation_ab.py"), "repopt", "--rounds", "1"]
    command += ["--image-size", "16", "--batch-size", "4"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "lean:" in finished.stdout and "layer by layer:" in finished.stdout
    assert "lean speed / layer by layer:" in finished.stdout
