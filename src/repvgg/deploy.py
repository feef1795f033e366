"""From a trained checkpoint to deployable files: convert, verify, export to ONNX and TorchScript.

Every step checks its own result: a conversion is verified in float64 before anything is written, and
an export is run again (onnxruntime, or ``torch.jit.load``) on an input of another shape and compared
with PyTorch. Files are written beside their destination and renamed into place, so a failed step
never leaves a damaged file behind.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from repvgg.checkpoints import (
    Checkpoint,
    PathLike,
    atomic_write,
    build_model,
    load_state_dict_strict,
    read_checkpoint,
    save_checkpoint,
)
from repvgg.exceptions import ConversionError, ExportError
from repvgg.formats import convert_state_dict
from repvgg.models import RepVGG
from repvgg.reparam import EquivalenceReport, is_deployed, reparameterizable_blocks, reparameterize
from repvgg.reparam import verify_equivalence as _verify_equivalence

CONVERSION_TOLERANCE = 1e-10
EXPORT_TOLERANCE = 1e-4
OUTPUT_FORMATS = ("repvgg", "official", "timm")
EXPORT_TARGETS = ("onnx", "torchscript")
ONNX_OPSET = 18


def to_deploy_form(model: nn.Module) -> tuple[nn.Module, bool]:
    """An eval-mode, gradient-free copy of ``model`` with every RepVGG block converted.

    Returns the copy and whether a conversion was needed. A network without RepVGG blocks (a
    baseline such as a ResNet) is copied as it is.
    """
    deployed = copy.deepcopy(model).eval()
    converted = bool(reparameterizable_blocks(deployed)) and not is_deployed(deployed)
    if converted:
        deployed = reparameterize(deployed, inplace=True)
    for parameter in deployed.parameters():
        parameter.requires_grad_(False)
    return deployed, converted


def _train_form_model(checkpoint: Checkpoint, source: PathLike) -> RepVGG:
    if checkpoint.form != "train":
        raise ConversionError(
            f"{source} is already a deploy-form checkpoint; convert the training-form checkpoint instead "
            "(e.g. model_train.safetensors)."
        )
    model = build_model(checkpoint)
    load_state_dict_strict(model, checkpoint)
    model.class_names = checkpoint.class_names
    model.preprocessing = checkpoint.preprocessing
    return model.eval()


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    output_format: str
    source_format: str
    report: EquivalenceReport
    note: str | None = None


def convert_checkpoint(source: PathLike, output: PathLike, *, to: str = "repvgg") -> ConversionResult:
    """Convert a training-form checkpoint (any format the package reads) into a deploy-form file.

    The fusion is computed in float64 and checked there on random input: if the largest relative
    difference exceeds 1e-10 nothing is written. The weights are then rounded once to float32. ``to``
    picks the key names: ``repvgg`` (our safetensors with metadata), or ``official`` / ``timm`` (a plain
    state dict, as a ``.safetensors`` file when ``output`` ends so, else ``torch.save``).
    """
    if to not in OUTPUT_FORMATS:
        raise ConversionError(f"Unknown output format {to!r}: choose one of {', '.join(OUTPUT_FORMATS)}.")
    checkpoint = read_checkpoint(source)
    model = _train_form_model(checkpoint, source).double()
    deployed = reparameterize(model)
    report = _verify_equivalence(model, deployed, dtype=torch.float64, tolerance=CONVERSION_TOLERANCE)
    if not report.passed:
        raise ConversionError(
            f"The conversion of {source} is not exact ({report}); nothing was written. Please report this "
            "with the checkpoint."
        )
    deployed = deployed.float()
    path = Path(output)
    if to == "repvgg":
        save_checkpoint(deployed, path)
        note = None
    else:
        write_state_dict(convert_state_dict(deployed.state_dict(), to=to), path)
        note = _unrecorded(deployed, to)
    return ConversionResult(path, to, checkpoint.source_format, report, note)


def _unrecorded(model: RepVGG, to: str) -> str | None:
    """What a plain state dict cannot hold about ``model``, for its users to pass back by hand."""
    lost = []
    if model.strides != (2, 2, 2, 2, 2):
        lost.append(f"the strides {model.strides} (pass strides= to repvgg.create_model)")
    if model.class_names or model.preprocessing:
        lost.append("the class names and preprocessing")
    return f"the {to} format holds weights only, without {' or '.join(lost)}" if lost else None


def write_state_dict(state: dict[str, Tensor], path: Path) -> None:
    """A plain state dict, the way other ecosystems store one: safetensors by suffix, else torch.save."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda target: save_file(tensors, str(target)))
    else:
        atomic_write(path, lambda target: torch.save(tensors, target))


def verify_checkpoints(train_source: PathLike, deploy_source: PathLike | None = None) -> EquivalenceReport:
    """Check that a deploy-form checkpoint reproduces its training-form one, in float64.

    Without ``deploy_source`` the training-form checkpoint is checked against its own conversion
    (tolerance 1e-10). With it, the stored deploy weights carry float32 rounding, so the tolerance is
    1e-5 for float32 files. The deploy weights are loaded into the training checkpoint's architecture,
    so a file in the authors' or timm's names (which record no strides) is checked as it will be used.
    """
    trained = _train_form_model(read_checkpoint(train_source), train_source)
    if deploy_source is None:
        return _verify_equivalence(trained, dtype=torch.float64, tolerance=CONVERSION_TOLERANCE)
    checkpoint = read_checkpoint(deploy_source)
    if checkpoint.form != "deploy":
        raise ConversionError(
            f"{deploy_source} is a training-form checkpoint; give the deploy-form one second, or leave it "
            "out to check the first against its own conversion."
        )
    if checkpoint.source_format == "repvgg" and checkpoint.config != trained.config:
        raise ConversionError(
            f"{deploy_source} was saved for another architecture ({checkpoint.config}) than {train_source} "
            f"({trained.config}); they are not a train/deploy pair."
        )
    deployed = RepVGG(**trained.config, deploy=True)
    load_state_dict_strict(deployed, checkpoint)
    return _verify_equivalence(trained, deployed.eval(), dtype=torch.float64)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    target: str
    converted: bool
    max_rel_difference: float
    check_input_shape: tuple[int, ...]

    def __str__(self) -> str:
        runner = "onnxruntime" if self.target == "onnx" else "torch.jit.load"
        return (
            f"wrote {self.path}; {runner} vs PyTorch on input {self.check_input_shape}: "
            f"max relative difference {self.max_rel_difference:.2e}"
        )


def default_input_shape(model: nn.Module, batch: int = 2) -> tuple[int, int, int, int]:
    """A plausible input for ``model``: its recorded training image size, else 224 px."""
    preprocessing: dict[str, Any] | None = getattr(model, "preprocessing", None)
    size = int(preprocessing["image_size"]) if preprocessing else 224
    channels = model.in_chans if isinstance(model, RepVGG) else 3
    return (batch, channels, size, size)


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Another batch size and spatial size than the export's, to prove the axes are dynamic."""
    batch, channels, height, width = shape
    return (batch + 1, channels, height + 8, width + 16)


def relative_difference(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    expected = expected.double()
    scale = float(expected.abs().max()) or 1.0
    return float((actual.double() - expected).abs().max()) / scale


def export_model(
    model: nn.Module,
    path: PathLike,
    *,
    to: str,
    input_shape: tuple[int, ...] | None = None,
    tolerance: float = EXPORT_TOLERANCE,
) -> ExportResult:
    """Export ``model`` (converted first if it is in training form) to ONNX or TorchScript.

    ONNX: one self-contained file (weights inside), opset 18, dynamic batch, height and width, checked
    with onnxruntime. TorchScript: traced and frozen, checked with ``torch.jit.load``. Either runs
    without this package. The check uses an input of another batch and spatial size than the export's.
    """
    if to not in EXPORT_TARGETS:
        raise ExportError(f"Unknown export target {to!r}: choose one of {', '.join(EXPORT_TARGETS)}.")
    writable_or_raise(path)
    deployed, converted = to_deploy_form(model)
    deployed = deployed.float().cpu()
    shape = tuple(input_shape) if input_shape else default_input_shape(deployed)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    check_input = torch.randn(_check_shape(shape), generator=torch.Generator().manual_seed(1))
    if to == "onnx":
        payload = onnx_bytes(deployed, example)
        actual = run_onnx(payload, check_input)
    else:
        buffer = io.BytesIO()
        with _quietly():
            torch.jit.save(torchscript_module(deployed, example), buffer)
            payload = buffer.getvalue()
            with torch.inference_mode():
                actual = torch.jit.load(io.BytesIO(payload))(check_input)
    with torch.inference_mode():
        expected = deployed(check_input)
    difference = relative_difference(actual, expected)
    if difference > tolerance:
        raise ExportError(
            f"The {to} export differs from PyTorch by {difference:.2e} (relative, limit {tolerance:.0e}), "
            "so it was not written; please report this with the model."
        )
    path = Path(path)
    atomic_write(
        path, lambda target: target.write_bytes(payload), what=f"the {to} model", error_type=ExportError
    )
    return ExportResult(path, to, converted, difference, tuple(check_input.shape))


def onnx_bytes(model: nn.Module, example: Tensor) -> bytes:
    """A serialized ONNX model with the weights inside and dynamic batch, height and width.

    Uses PyTorch's ``torch.export``-based exporter (the supported one since PyTorch 2.9); the axes get
    readable names (``batch``, ``height``, ``width``) in place of the exporter's symbols.
    """
    from torch.export import Dim

    dynamic = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    try:
        with _quietly():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                external_data=False,
                opset_version=ONNX_OPSET,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=(dynamic,),
                verbose=False,
            )
    except ImportError as error:
        raise ExportError(
            f"ONNX export needs the onnx and onnxscript packages ({error}); pip install 'repvgg[deploy]'."
        ) from error
    assert program is not None
    proto = program.model_proto
    _name_dynamic_axes(proto)
    return proto.SerializeToString()


def _name_dynamic_axes(proto: Any) -> None:
    """Rename the exporter's symbols (``s77``) for the input's axes to batch/height/width everywhere."""
    graph = proto.graph
    names = {}
    for dim, name in zip(
        graph.input[0].type.tensor_type.shape.dim, ("batch", None, "height", "width"), strict=True
    ):
        if name and dim.dim_param:
            names[dim.dim_param] = name
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """Silence PyTorch exporters' progress lines and warnings (TorchScript, deprecated, warns on every
    call); their errors still propagate."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def onnx_session(payload: bytes | str, *, threads: int | None = None, device: str = "cpu") -> Any:
    """An onnxruntime session with all graph optimizations, on the CPU (or CUDA when available)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ExportError("Running ONNX models needs onnxruntime: pip install 'repvgg[deploy]'.") from error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError(
                "This onnxruntime has no CUDA support; pip install onnxruntime-gpu, or use another backend."
            )
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(payload, options, providers=providers)


def run_onnx(payload: bytes | str, inputs: Tensor) -> Tensor:
    session = onnx_session(payload)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


def torchscript_module(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    """Traced and frozen (weights folded in as constants), so it runs with ``torch.jit.load`` alone."""
    with _quietly(), torch.no_grad():
        traced = torch.jit.trace(model, example)
        return torch.jit.freeze(traced.eval())


def writable_or_raise(path: PathLike) -> None:
    """Refuse early, before any slow work, an output path that cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise ExportError(f"{target} is a folder; give a file name for the exported model.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as error:
        raise ExportError(
            f"Cannot write to {target.parent} ({error.strerror or error}); choose a folder you can write to."
        ) from error
