"""Messages that once misled: each says what the thing is and advice that works when followed."""

from __future__ import annotations

from pathlib import Path

import pytest

import repvgg
from repvgg.cli import main
from tests.helpers import small_model, with_nan_in
from tests.test_data import fake_fashion_mnist


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=64, test=32)


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"repvgg {argv[0]}: error: "), lines
    return lines[0]


def test_a_torchscript_file_is_called_one(
    tmp_path: Path, fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was "a damaged or truncated PyTorch file; save it again"."""
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    assert main(["export", str(checkpoint), str(tmp_path / "m.pt")]) == 0
    for argv in (
        ["eval", str(tmp_path / "m.pt"), "--data-dir", str(fashion)],
        ["convert", str(tmp_path / "m.pt"), str(tmp_path / "d.safetensors")],
    ):
        error = _error(argv, capsys)
        assert "is a TorchScript program" in error and "torch.jit.load" in error and "damaged" not in error


def test_export_to_a_name_without_a_format_names_the_files_that_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It suggested --to, which then refused the same name."""
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    error = _error(["export", str(checkpoint), str(tmp_path / "x.txt")], capsys)
    assert "name it x.onnx (ONNX) or x.pt (TorchScript)" in error and "--to" not in error
    assert main(["export", str(checkpoint), str(tmp_path / "x.onnx")]) == 0, "the advice works"


def test_init_from_weights_that_are_not_finite_names_them(
    tmp_path: Path, fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "lower --lr" once the loss diverged, about weights that were never finite."""
    model = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1)
    bad = with_nan_in(
        repvgg.save_checkpoint(model, tmp_path / "a0.safetensors"), "stage1.0.rbr_dense.conv.weight"
    )
    argv = ["train", "--data-dir", str(fashion), "--output", str(tmp_path / "run"), "--epochs", "1"]
    error = _error([*argv, "--batch-size", "16", "--init", str(bad), "--no-progress"], capsys)
    assert (
        "holds weights that are not finite (stage1.0.rbr_dense.conv.weight)" in error
        and "lower" not in error.split("(")[0]
    )
    assert not (tmp_path / "run").exists(), "a refused run leaves no folder"


def test_a_file_named_onnx_that_is_not_one_is_not_called_one(
    tmp_path: Path, fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    fake = tmp_path / "weights.onnx"
    torch.save({"w": torch.zeros(2)}, fake)
    argv = ["train-seg", "--data-dir", str(fashion), "--output", str(tmp_path / "seg"), "--backbone-weights"]
    error = _error([*argv, str(fake)], capsys)
    assert "is an ONNX model" not in error and "not a checkpoint in a known format" in error
    error = _error(["eval", str(fake), "--data-dir", str(fashion)], capsys)
    assert "is not an ONNX model onnxruntime can run" in error


def test_a_refused_command_leaves_no_output_folder(
    tmp_path: Path, fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    for argv in (
        [
            "quantize",
            str(checkpoint),
            str(tmp_path / "new" / "q.safetensors"),
            "--data",
            "cifar10",
            "--data-dir",
            str(fashion),
        ],
        [
            "eval",
            str(checkpoint),
            "--data-dir",
            str(tmp_path / "missing"),
            "--results-file",
            str(tmp_path / "new" / "r.json"),
        ],
        ["train", "--output", str(tmp_path / "new" / "run"), "--data-dir", str(tmp_path / "missing")],
        ["export", str(tmp_path / "missing.safetensors"), str(tmp_path / "new" / "m.onnx")],
    ):
        _error(argv, capsys)
        assert not (tmp_path / "new").exists(), argv
