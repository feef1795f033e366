"""The README's ImageNet recipe, run as written at toy size: `repvgg shard` of an image folder, then the
one-machine `torchrun` line with 2 CPU processes over gloo (sizes shrunk, every flag kept)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data import make_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"

#: What makes the recipe a toy: the README's value of each flag -> the test's.
TOY = {
    "--nproc_per_node": "2",
    "--epochs": "2",
    "--batch-size": "4",
    "--workers": "2",
    "--shard-size": "5",
    "--keep-best": "2",
}


def recipe_commands() -> list[list[str]]:
    """The commands of the README's recipe block (the one that runs `repvgg shard`), continuation lines
    joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "repvgg shard" in b and "torchrun --standalone" in b]
    text = block.replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def toy(command: list[str], paths: dict[str, str]) -> list[str]:
    out = []
    for i, word in enumerate(command):
        previous = command[i - 1] if i else ""
        out.append(TOY.get(previous, paths.get(word, word)))
    return out


@pytest.mark.slow
def test_the_readme_recipe_runs_end_to_end_from_shards_on_two_processes(tmp_path: Path) -> None:
    commands = recipe_commands()
    shard, standalone = commands[0], commands[1]
    assert shard[:2] == ["repvgg", "shard"] and standalone[:2] == ["torchrun", "--standalone"]
    assert len(commands) == 3 and commands[2][:2] == ["torchrun", "--nnodes"], "the multi-node line is shown"
    images = make_image_folder(tmp_path / "imagenet", per_class=12)
    paths = {
        "/data/imagenet": str(images),
        "/data/imagenet-shards": str(tmp_path / "shards"),
        "runs/a0-imagenet": str(tmp_path / "run"),
    }
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    written = subprocess.run(
        [*toy(shard, paths), "--no-progress"], capture_output=True, text=True, env=env, timeout=300
    )
    assert written.returncode == 0, written.stdout + written.stderr
    assert len(list((tmp_path / "shards" / "train").glob("shard-*.tar"))) == 5, "24 images, 5 per shard"
    command = [*toy(standalone, paths), "--image-size", "32", "--no-progress"]
    assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *command[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["ranks_hold_identical_weights"] and summary["forms_agree"]
    assert summary["train_form"]["images"] == 24, "evaluation counted every validation image once"
    assert summary["best"]["deploy_form"] == "best_deploy.safetensors"
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"] == "shards" and saved["amp"] == "bf16" and saved["keep_best"] == 2
    assert saved["crop_pct"] == 0.875
    assert "effective batch 8" in result.stdout and "0.1 x effective batch / 256" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(0.1 * 8 / 256), "lr follows the effective batch"
    assert len(json.loads((run / "checkpoints" / "best.json").read_text())) == 2
