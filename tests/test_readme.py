"""The README's Python code runs as written, and its model table matches `repvgg models`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_runs(index: int, tmp_path: Path) -> None:
    code = python_blocks()[index]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


def test_readme_model_table_is_current() -> None:
    import contextlib
    import io

    from repvgg.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(["models", "--format", "markdown"])
    assert buffer.getvalue().strip() in README.read_text()


@pytest.mark.slow
def test_the_fine_tuning_section_runs_from_the_images_to_the_results_file(tmp_path: Path) -> None:
    """The README's fine-tuning commands, at a tiny size, with an authors'-format file as the weights."""
    import torch
    from PIL import Image

    import repvgg
    from repvgg.cli import main
    from tests.test_data import fake_fashion_mnist

    fashion = fake_fashion_mnist(tmp_path / "fashion", train=16, test=120)  # 12 of each class
    folder = tmp_path / "footwear"
    script = Path(__file__).resolve().parents[1] / "examples" / "make_imagefolder.py"
    made = subprocess.run(
        [sys.executable, str(script), str(folder), "--data-dir", str(fashion), "--train", "6", "--val", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    files = sorted((folder / "train").rglob("*.*"))
    assert {p.suffix for p in files} == {".png", ".jpg"} and {p.parent.name for p in files} <= {
        "sandal",
        "sneaker",
        "ankle_boot",
        "bag",
    }
    with Image.open(files[0]) as image:
        assert image.mode == "RGB" and image.size == (64, 64)
    weights = tmp_path / "RepVGG-A0-train.pth"
    torch.save(
        repvgg.convert_state_dict(repvgg.create_model("repvgg_a0").state_dict(), to="official"), weights
    )
    run = tmp_path / "runs" / "footwear-finetune"
    train = f"train --data imagefolder --data-dir {folder} --image-size 64 --epochs 1 --lr 0.01 --pretrained "
    train += f"{weights} --finetune --freeze-stages 1 --head-lr-mult 10 --output {run} --batch-size 4"
    assert main([*train.split(), "--no-progress"]) == 0
    evaluation = f"eval {run}/model_deploy.safetensors --data imagefolder --data-dir {folder} --results-file "
    assert main([*(evaluation + f"{run}/eval.csv").split(), "--no-progress"]) == 0
    assert (run / "eval.csv").read_text().startswith("class,images,top1") and (
        run / "eval_confusion.png"
    ).exists()
    predictions = tmp_path / "predictions.csv"
    assert (
        main(
            [
                "predict",
                str(run / "model_deploy.safetensors"),
                str(folder / "val"),
                "--output",
                str(predictions),
            ]
        )
        == 0
    )
    assert len(predictions.read_text().splitlines()) == 1 + len(list((folder / "val").rglob("*.*")))
