"""Convert, verify and export checkpoints (``repvgg.runtime.convert``, ``repvgg.runtime.export``, CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import repvgg
from repvgg.cli import main
from repvgg.core.info import PREPROCESSING_PRESETS
from repvgg.core.reparam import TOLERANCE, EquivalenceReport
from repvgg.exceptions import ConversionError, ExportError
from repvgg.runtime.convert import convert_checkpoint, verify_checkpoints
from repvgg.runtime.export import export_model
from tests.helpers import SMALL, STRIDES, relative_error, small_model


@pytest.fixture()
def train_file(tmp_path: Path) -> Path:
    return repvgg.save_checkpoint(small_model(), tmp_path / "model_train.safetensors")


def test_convert_writes_a_verified_deploy_checkpoint_with_its_metadata(
    train_file: Path, tmp_path: Path
) -> None:
    result = convert_checkpoint(train_file, tmp_path / "deploy.safetensors")
    assert result.report.passed and result.report.max_rel_error < 1e-12
    assert result.report.dtype == torch.float64 and result.note is None
    deployed = repvgg.load_checkpoint(result.path)
    assert repvgg.is_deployed(deployed) and deployed.strides == STRIDES
    assert deployed.class_names == [f"class {i}" for i in range(10)]
    assert deployed.preprocessing == PREPROCESSING_PRESETS["fashion-mnist"]
    inputs = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert relative_error(deployed(inputs), small_model()(inputs)) < 1e-5


@pytest.mark.parametrize(("to", "name"), [("official", "deploy.pth"), ("timm", "deploy.safetensors")])
def test_convert_to_other_ecosystems_names(train_file: Path, tmp_path: Path, to: str, name: str) -> None:
    result = convert_checkpoint(train_file, tmp_path / name, to=to)
    assert result.note is not None and "strides (1, 2, 2, 2, 2)" in result.note
    checkpoint = repvgg.read_checkpoint(result.path)
    assert checkpoint.source_format == to and checkpoint.form == "deploy"
    model = repvgg.RepVGG(num_classes=10, in_chans=1, strides=STRIDES, deploy=True, **SMALL)  # type: ignore[arg-type]
    repvgg.load_checkpoint(result.path, model=model)
    inputs = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert relative_error(model.eval()(inputs), small_model()(inputs)) < 1e-5
    assert verify_checkpoints(train_file, result.path).passed


def test_convert_refuses_a_deploy_checkpoint_and_writes_nothing(train_file: Path, tmp_path: Path) -> None:
    deploy = convert_checkpoint(train_file, tmp_path / "deploy.safetensors").path
    with pytest.raises(ConversionError, match="already a deploy-form checkpoint"):
        convert_checkpoint(deploy, tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()


def test_an_inexact_conversion_writes_nothing(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = EquivalenceReport(1e-3, 1e-4, 1.0, torch.float64, (2, 1, 64, 48), 1e-10)
    monkeypatch.setattr("repvgg.runtime.convert.verify_equivalence", lambda *a, **k: failing)
    with pytest.raises(ConversionError, match=r"not exact .* nothing was written"):
        convert_checkpoint(train_file, tmp_path / "deploy.safetensors")
    assert list(tmp_path.iterdir()) == [train_file]


def test_verify_a_pair_and_catch_a_wrong_pair(train_file: Path, tmp_path: Path) -> None:
    deploy = convert_checkpoint(train_file, tmp_path / "deploy.safetensors").path
    assert verify_checkpoints(train_file).max_rel_error < 1e-12
    good = verify_checkpoints(train_file, deploy)
    assert good.passed and good.tolerance == TOLERANCE[torch.float32]
    other = repvgg.save_checkpoint(repvgg.reparameterize(small_model(seed=7)), tmp_path / "other.safetensors")
    assert not verify_checkpoints(train_file, other).passed
    with pytest.raises(ConversionError, match="training-form checkpoint; give the deploy-form one second"):
        verify_checkpoints(train_file, train_file)
    wider = repvgg.save_checkpoint(
        repvgg.reparameterize(small_model(width_multiplier=[0.5, 0.5, 0.5, 1])),
        tmp_path / "wider.safetensors",
    )
    with pytest.raises(ConversionError, match="another architecture"):
        verify_checkpoints(train_file, wider)


def test_convert_and_verify_commands(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy = tmp_path / "deploy.safetensors"
    assert main(["convert", str(train_file), str(deploy)]) == 0
    out = capsys.readouterr().out
    assert "ok at tolerance 1e-10" in out and f"wrote the deploy-form checkpoint {deploy}" in out
    assert main(["verify", str(train_file), str(deploy)]) == 0
    assert "ok at tolerance 1e-04" in capsys.readouterr().out
    other = repvgg.save_checkpoint(repvgg.reparameterize(small_model(seed=7)), tmp_path / "other.safetensors")
    assert main(["verify", str(train_file), str(other)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["convert", str(deploy), str(tmp_path / "x.safetensors")]) == 2
    assert "already a deploy-form checkpoint" in capsys.readouterr().err


# A fresh interpreter in which `import repvgg` fails: an export must run without this package.
STANDALONE = """
import sys
sys.modules["repvgg"] = None
import numpy as np
inputs = np.load(sys.argv[2])
{body}
np.save(sys.argv[3], outputs)
"""
RUN_ONNX = """
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
outputs = session.run(None, {"images": inputs})[0]
"""
RUN_TORCHSCRIPT = """
import torch
outputs = torch.jit.load(sys.argv[1])(torch.from_numpy(inputs)).detach().numpy()
"""


def run_standalone(body: str, model_path: Path, inputs: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    import numpy as np

    np.save(tmp_path / "inputs.npy", inputs.numpy())
    script = STANDALONE.format(body=textwrap.dedent(body))
    subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(model_path),
            str(tmp_path / "inputs.npy"),
            str(tmp_path / "out.npy"),
        ],
        check=True,
        cwd=tmp_path,
    )
    return torch.from_numpy(np.load(tmp_path / "out.npy"))


@pytest.mark.slow
def test_onnx_export_is_one_file_with_dynamic_axes_and_runs_without_repvgg(tmp_path: Path) -> None:
    import onnx

    model = small_model()
    result = export_model(model, tmp_path / "model.onnx", to="onnx")
    assert result.converted and result.max_rel_difference < 1e-5
    assert result.check_input_shape == (3, 1, 36, 44)  # not the (2, 1, 28, 28) it was exported with
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # weights inside, no side files
    proto = onnx.load(str(result.path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]
    inputs = torch.randn(5, 1, 40, 32)
    outputs = run_standalone(RUN_ONNX, result.path, inputs, tmp_path)
    with torch.no_grad():
        assert relative_error(outputs, model(inputs)) < 1e-5


@pytest.mark.slow
def test_torchscript_export_is_frozen_and_runs_without_repvgg(tmp_path: Path) -> None:
    model = small_model()
    result = export_model(repvgg.reparameterize(model), tmp_path / "model.pt", to="torchscript")
    assert not result.converted and result.max_rel_difference < 1e-5
    inputs = torch.randn(4, 1, 36, 28)
    outputs = run_standalone(RUN_TORCHSCRIPT, result.path, inputs, tmp_path)
    with torch.no_grad():
        assert relative_error(outputs, model(inputs)) < 1e-5


def test_export_command_converts_a_train_checkpoint_first(
    train_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(train_file), "--to", "torchscript", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert "is in training form; converting it before the export" in out
    assert "torch.jit.load vs PyTorch on input (3, 1, 36, 44): max relative difference" in out


def test_export_refuses_an_unwritable_target_before_working(train_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ExportError, match=r"Cannot write to .*a-file"):
        export_model(small_model(), blocker / "model.onnx", to="onnx")
    with pytest.raises(ExportError, match="is a folder; give a file name"):
        export_model(small_model(), tmp_path, to="torchscript")
    assert main(["export", str(train_file), "--to", "onnx", str(blocker / "m.onnx")]) == 2


def test_export_that_disagrees_with_pytorch_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("repvgg.runtime.export.relative_error", lambda *a: 0.5)
    with pytest.raises(ExportError, match=r"differs from PyTorch .* not written"):
        export_model(small_model(), tmp_path / "model.pt", to="torchscript")
    assert not (tmp_path / "model.pt").exists()


def test_onnx_files_carry_the_class_names_and_preprocessing(tmp_path: Path) -> None:
    import onnxruntime

    model = small_model()
    result = export_model(model, tmp_path / "model.onnx", to="onnx")
    metadata = onnxruntime.InferenceSession(str(result.path)).get_modelmeta().custom_metadata_map
    assert json.loads(metadata["class_names"]) == model.class_names
    assert json.loads(metadata["preprocessing"]) == model.preprocessing.as_dict()
    assert metadata["form"] == "deploy", "the file holds the converted network"
