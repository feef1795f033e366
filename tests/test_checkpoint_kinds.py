"""Every kind of model file through every command that reads one: it works, or it is refused in one sentence
saying what the file is and what the command takes; never a traceback.

The kinds are the files this package writes: a classifier's training and deploy checkpoints and its run's
``last.pt``, the same three of a PSPNet, an INT8 checkpoint, ONNX exports of a classifier and of a PSPNet,
and a TorchScript export. Found by a hostile-input pass: ``verify`` of a PSPNet pair, ``quantize`` of a
PSPNet, ``eval``/``predict`` of a PSPNet's ``last.pt`` and ``export``/``quantize`` of an ONNX file all ended
in tracebacks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repvgg.cli import main
from tests.test_data import fake_fashion_mnist

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("default::repvgg.exceptions.RepVGGWarning")]

COMMANDS = {  # {x}: the file; {train}: the same network's training-form checkpoint; {tmp}: a fresh folder
    "eval": "eval {x} --data-dir {data} --val-subset 16 --no-progress",
    "predict": "predict {x} {png} --output {predictions}",
    "convert": "convert {x} {tmp}/c.safetensors",
    "verify": "verify {x}",
    "verify-pair": "verify {train} {x}",
    "export-onnx": "export {x} {tmp}/e.onnx",
    "export-torchscript": "export {x} {tmp}/e.pt",
    "quantize": "quantize {x} {tmp}/q.safetensors --data-dir {data} --calib 8 --no-progress",
    "optimize": "optimize {x} {tmp}/o.safetensors --data-dir {data} --val-subset 16 --calib 8 "
    "--backend eager --repeats 1 --precision fp32 --no-progress",
    "bench": "bench --quick --models --baselines --no-timm --no-extras --no-memory --output {tmp}/bench "
    "--checkpoints {x}",
    "train-init": "train --data-dir {data} --output {tmp}/run --epochs 1 --batch-size 16 --train-subset 32 "
    "--val-subset 16 --no-progress --init {x}",
    "train-seg-backbone": "train-seg --data-dir {data} --output {tmp}/seg --epochs 1 --batch-size 4 "
    "--head-channels 16 --train-subset 8 --val-subset 4 --no-progress --backbone-weights {x}",
}

OK = "works"
TRAINING_FORM = "is a training-form checkpoint; give the deploy-form one second"
DEPLOY_FORM = "is already a deploy-form checkpoint; convert the training-form checkpoint"
PSPNET = "is a PSPNet (segmentation) checkpoint, but"
INT8 = "is an INT8 (quantized) checkpoint, but"
ONNX = "is an ONNX model, but"
PSPNET_ONNX = "is a PSPNet's ONNX export, but"
TORCHSCRIPT = "is a TorchScript program (as `repvgg export` writes .pt files), but"

EVERY_COMMAND_WORKS = dict.fromkeys(COMMANDS, OK)
EXPECTED: dict[str, dict[str, str]] = {  # kind -> command -> works, or the refusal's words
    "classifier_train": {**EVERY_COMMAND_WORKS, "verify-pair": TRAINING_FORM},
    "classifier_deploy": {
        **EVERY_COMMAND_WORKS,
        "convert": DEPLOY_FORM,
        "verify": DEPLOY_FORM,
        "train-init": "holds a deploy-form model but the model is in train form",
        "train-seg-backbone": "is a deploy-form (converted) checkpoint; a PSPNet's backbone trains from",
    },
    "classifier_last": {**EVERY_COMMAND_WORKS, "verify-pair": TRAINING_FORM},
    "pspnet_train": {
        **EVERY_COMMAND_WORKS,
        "verify-pair": TRAINING_FORM,
        **dict.fromkeys(("quantize", "optimize", "train-init", "train-seg-backbone"), PSPNET),
    },
    "pspnet_deploy": {
        **EVERY_COMMAND_WORKS,
        "convert": DEPLOY_FORM,
        "verify": DEPLOY_FORM,
        **dict.fromkeys(("quantize", "optimize", "train-init", "train-seg-backbone"), PSPNET),
    },
    "pspnet_last": {
        **EVERY_COMMAND_WORKS,
        "verify-pair": TRAINING_FORM,
        **dict.fromkeys(("quantize", "optimize", "train-init", "train-seg-backbone"), PSPNET),
    },
    "int8": {
        **dict.fromkeys(COMMANDS, INT8),
        "eval": OK,
        "predict": OK,
        "bench": OK,
        "quantize": "is already INT8; quantize the float checkpoint instead",
    },
    "onnx": {**dict.fromkeys(COMMANDS, ONNX), "eval": OK, "predict": OK, "bench": OK},
    "pspnet_onnx": dict.fromkeys(COMMANDS, PSPNET_ONNX),
    "torchscript": dict.fromkeys(COMMANDS, TORCHSCRIPT),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file of every kind, each made by the command that makes it."""
    root = tmp_path_factory.mktemp("kinds")
    data = fake_fashion_mnist(root / "fashion", train=64, test=32)
    small = ["--epochs", "1", "--no-progress", "--data-dir", str(data)]
    assert (
        main(["train", *small, "--output", f"{root}/cls", "--batch-size", "16", "--train-subset", "32"]) == 0
    )
    seg = ["--batch-size", "4", "--head-channels", "16", "--train-subset", "8", "--val-subset", "4"]
    assert main(["train-seg", *small, "--output", f"{root}/seg", *seg]) == 0
    made = {
        "data": data,
        "classifier_train": root / "cls" / "model_train.safetensors",
        "classifier_deploy": root / "cls" / "model_deploy.safetensors",
        "classifier_last": root / "cls" / "last.pt",
        "pspnet_train": root / "seg" / "pspnet_train.safetensors",
        "pspnet_deploy": root / "seg" / "pspnet_deploy.safetensors",
        "pspnet_last": root / "seg" / "last.pt",
        "int8": root / "int8.safetensors",
        "onnx": root / "classifier.onnx",
        "pspnet_onnx": root / "pspnet.onnx",
        "torchscript": root / "classifier.pt",
        "png": root / "image.png",
    }
    quantize = ["quantize", str(made["classifier_train"]), str(made["int8"]), "--data-dir", str(data)]
    assert main([*quantize, "--calib", "8", "--no-progress"]) == 0
    assert main(["export", str(made["classifier_deploy"]), str(made["onnx"])]) == 0
    assert main(["export", str(made["pspnet_deploy"]), str(made["pspnet_onnx"])]) == 0
    assert main(["export", str(made["classifier_deploy"]), str(made["torchscript"])]) == 0
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(made["png"])
    return made


CASES = [(kind, command) for kind in EXPECTED for command in COMMANDS]


def test_the_table_names_every_kind_and_command() -> None:
    assert all(set(row) == set(COMMANDS) for row in EXPECTED.values())
    assert len(CASES) == 120


@pytest.mark.parametrize(("kind", "command"), CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_every_kind_of_file_through_every_command(
    kind: str, command: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pspnet = kind.startswith("pspnet")
    names = {
        "x": str(files[kind]),
        "train": str(files["pspnet_train" if pspnet else "classifier_train"]),
        "data": str(files["data"]),
        "png": str(files["png"]),
        "tmp": str(tmp_path),
        "predictions": str(tmp_path / ("masks" if pspnet else "predictions.csv")),
    }
    argv = COMMANDS[command].format_map(names).split()
    before = files[kind].read_bytes()
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    expected = EXPECTED[kind][command]
    if expected == OK:
        assert code == 0, err
    else:
        errors = [line for line in err.splitlines() if line.startswith(f"repvgg {argv[0]}: error: ")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert files[kind].read_bytes() == before, "the file read was changed"
    shutil.rmtree(tmp_path, ignore_errors=True)
