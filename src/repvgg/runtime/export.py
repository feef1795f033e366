"""Exporting a model to ONNX and TorchScript, each export checked by running it again.

An export is run (onnxruntime, or ``torch.jit.load``) on an input of another shape than the export's and
compared with PyTorch; nothing is written unless it agrees. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.core.info import ModelInfo, model_info
from repvgg.core.reparam import refuse_nonfinite, relative_error, to_deploy_form, tolerance_for
from repvgg.exceptions import ExportError
from repvgg.io.files import PathLike, atomic_write, writable_or_raise
from repvgg.io.onnxfile import onnx_session
from repvgg.runtime.names import EXPORT_SUFFIXES, EXPORT_TARGETS

ONNX_OPSET = 18


@dataclass(frozen=True)
class ExportResult:
    path: Path
    target: str
    converted: bool
    max_rel_difference: float
    check_input_shape: tuple[int, ...]
    fixed_size: tuple[int, int] | None = None  # height and width, where the export cannot vary them

    def __str__(self) -> str:
        runner = "onnxruntime" if self.target == "onnx" else "torch.jit.load"
        text = (
            f"wrote {self.path}; {runner} vs PyTorch on input {self.check_input_shape}: "
            f"max relative difference {self.max_rel_difference:.2e}"
        )
        if self.fixed_size is not None:
            height, width = self.fixed_size
            text += (
                f"; its input is {height}x{width} only (adaptive pooling exports for one size: export "
                "again at the size you need)"
            )
        return text


def default_input_shape(model: nn.Module, batch: int = 2) -> tuple[int, int, int, int]:
    """A plausible input for ``model``: its recorded training image size, else 224 px."""
    info = model_info(model)
    size = info.preprocessing.image_size if info.preprocessing else 224
    return (batch, info.in_chans, size, size)


def _check_shape(shape: tuple[int, ...], spatial: bool = True) -> tuple[int, ...]:
    """Another batch size (and, with ``spatial``, spatial size) than the export's: the axes are dynamic."""
    batch, channels, height, width = shape
    return (batch + 1, channels, height + 8, width + 16) if spatial else (batch + 1, channels, height, width)


def has_fixed_pooling(model: nn.Module) -> bool:
    """Whether ``model`` pools adaptively to more than one cell (PSPNet's pyramid): ONNX exports such pooling
    for the example's size only, so height and width cannot stay dynamic."""
    return any(
        isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) and m.output_size not in (1, (1, 1))
        for m in model.modules()
    )


def export_target(path: PathLike, to: str | None = None) -> str:
    """The export format for ``path``: ``to`` when given, else the one its suffix names. A file name that
    does not fit the format (``to="onnx"`` with ``model.pt``; ``model.txt``) is refused, so that nobody
    opens an ONNX file as TorchScript."""
    suffix = Path(path).suffix.lower()
    named = next((target for target, suffixes in EXPORT_SUFFIXES.items() if suffix in suffixes), None)
    if to is not None and to not in EXPORT_TARGETS:
        raise ExportError(f"Unknown export target {to!r}: choose one of {', '.join(EXPORT_TARGETS)}.")
    if to is None and named is None:
        raise ExportError(
            f"{Path(path).name} does not say the format: name it {Path(path).with_suffix('.onnx').name} "
            f"(ONNX) or {Path(path).with_suffix('.pt').name} (TorchScript)."
        )
    chosen = to or named
    assert chosen is not None
    if named != chosen:
        usual = EXPORT_SUFFIXES[chosen][0]
        raise ExportError(
            f"{Path(path).name} is not a {chosen} file name: name it {Path(path).with_suffix(usual).name} "
            f"(or choose the format its suffix names)."
        )
    return chosen


def export_model(
    model: nn.Module,
    path: PathLike,
    *,
    to: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    tolerance: float | None = None,
) -> ExportResult:
    """Export ``model`` (converted first if it is in training form) to ONNX or TorchScript.

    ``to`` is ``onnx`` or ``torchscript``; by default the suffix of ``path`` says (:func:`export_target`).
    ONNX: one self-contained file (weights inside), opset 18, dynamic batch, height and width, checked
    with onnxruntime. TorchScript: traced and frozen, checked with ``torch.jit.load``. Either runs
    without this package. The check uses an input of another batch and spatial size than the export's, and
    must agree within ``tolerance`` (default: the float32 entry of the one tolerance table).
    """
    writable_or_raise(path, ExportError)
    to = export_target(path, to)
    refuse_nonfinite(model, "The model", ExportError)
    if model_info(model).precision == "int8":
        raise ExportError(
            "INT8 models run with PyTorch's x86 quantized engine and are not exported; export the float "
            "checkpoint they were quantized from."
        )
    if tolerance is None:
        tolerance = tolerance_for(torch.float32)
    deployed, converted = to_deploy_form(model)
    deployed = deployed.float().cpu()
    shape = tuple(input_shape) if input_shape else default_input_shape(deployed)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    spatial = not (to == "onnx" and has_fixed_pooling(deployed))
    check_input = torch.randn(_check_shape(shape, spatial), generator=torch.Generator().manual_seed(1))
    if to == "onnx":
        payload = onnx_bytes(deployed, example, spatial)
        try:
            actual = run_onnx(payload, check_input)
        except Exception as error:  # onnxruntime's own error types: the check is the boundary
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ExportError(
                f"onnxruntime could not run the exported model on input {tuple(check_input.shape)} "
                f"({first}), so it was not written; please report this with the model."
            ) from error
    else:
        buffer = io.BytesIO()
        with _quietly():
            torch.jit.save(torchscript_module(deployed, example), buffer)
            payload = buffer.getvalue()
            with torch.inference_mode():
                actual = torch.jit.load(io.BytesIO(payload))(check_input)
    with torch.inference_mode():
        expected = deployed(check_input)
    difference = relative_error(actual, expected)
    if not difference <= tolerance:  # NaN included
        raise ExportError(
            f"The {to} export differs from PyTorch by {difference:.2e} (relative, limit {tolerance:.0e}), "
            "so it was not written; please report this with the model."
        )
    path = Path(path)
    atomic_write(
        path, lambda target: target.write_bytes(payload), what=f"the {to} model", error_type=ExportError
    )
    fixed = None if spatial else (shape[2], shape[3])
    return ExportResult(path, to, converted, difference, tuple(check_input.shape), fixed)


def onnx_bytes(model: nn.Module, example: Tensor, spatial: bool = True) -> bytes:
    """A serialized ONNX model with the weights inside and dynamic batch (and, with ``spatial``, height and
    width).

    Uses PyTorch's ``torch.export``-based exporter (the supported one since PyTorch 2.9); the axes get
    readable names (``batch``, ``height``, ``width``) in place of the exporter's symbols.
    """
    from torch.export import Dim

    dynamic = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC} if spatial else {0: Dim.DYNAMIC}
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
    _record_model_info(proto, model)
    return proto.SerializeToString()


def _record_model_info(proto: Any, model: nn.Module) -> None:
    """The model's record as ONNX metadata (``metadata_props``): class names, preprocessing (size, resize,
    mean, std), name and config, as JSON strings, so that a runtime without this package can label outputs
    and prepare inputs (onnxruntime: ``session.get_modelmeta().custom_metadata_map``)."""
    for key, value in model_info(model).to_metadata().items():
        if value:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value


def onnx_with_record(payload: bytes, info: ModelInfo) -> bytes:
    """An ONNX model with ``info`` as its metadata in place of any record it had (a quantized graph, say)."""
    import onnx

    proto = onnx.load_from_string(payload)
    keep = [entry for entry in proto.metadata_props if entry.key not in info.to_metadata()]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in info.to_metadata().items():
        if value:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
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


def run_onnx(payload: bytes | str, inputs: Tensor) -> Tensor:
    session = onnx_session(payload)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


def torchscript_module(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    """Traced and frozen (weights folded in as constants), so it runs with ``torch.jit.load`` alone."""
    with _quietly(), torch.no_grad():
        traced = torch.jit.trace(model, example)
        return torch.jit.freeze(traced.eval())
