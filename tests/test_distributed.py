"""Multi-process training with PyTorch DDP, launched by torchrun: 2 CPU processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data import fake_fashion_mnist


@pytest.mark.slow
@pytest.mark.parametrize("block", ["repvgg", "repopt"])  # repopt: one kept activation per block, multipliers
def test_two_processes_train_and_end_with_identical_weights(tmp_path: Path, block: str) -> None:
    data = fake_fashion_mnist(tmp_path / "fashion", train=128, test=64)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "repvgg",
        "train",
        "--data-dir",
        str(data),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--output",
        str(tmp_path / "run"),
        "--no-progress",
        "--block",
        block,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["ranks_hold_identical_weights"]
    assert summary["forms_agree"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2], "rank 0 alone writes the log"
    assert records[0]["lr"] == pytest.approx(0.1 * 16 * 2 / 256), "lr follows the global batch"
    assert result.stdout.count("epoch 1/2:") == 1, "rank 0 alone prints"


def test_sync_bn_on_cpu_is_explained(tmp_path: Path) -> None:
    from repvgg.engine.config import TrainConfig
    from repvgg.engine.distributed import DistContext
    from repvgg.engine.training import ClassificationRun
    from repvgg.exceptions import TrainingError

    config = TrainConfig(data_dir=str(fake_fashion_mnist(tmp_path)), sync_bn=True, output=str(tmp_path / "r"))
    with pytest.raises(TrainingError, match="`sync_bn` needs CUDA"):
        ClassificationRun(config, DistContext())
