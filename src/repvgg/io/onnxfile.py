"""ONNX files as models: the ones this package writes (``repvgg export``, ``repvgg optimize``) carry the model
record in their metadata, so ``eval``, ``predict`` and ``bench`` run them like checkpoints, with onnxruntime.

An ONNX file from elsewhere is read too: its input and output shapes give the channels and classes, and the
commands say that its preprocessing and class names are unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.core.info import ModelInfo, RecordBacked
from repvgg.core.models import RepVGG
from repvgg.exceptions import CheckpointError, ExportError
from repvgg.io.files import PathLike


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
    # Without this its threads spin on after each run, taking the cores from whatever runs next (a
    # PyTorch backend timed in turn with it, say), which makes every other candidate look slower.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError(
                "This onnxruntime has no CUDA support; pip install onnxruntime-gpu, or use another backend."
            )
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(payload, options, providers=providers)


class OnnxModel(RecordBacked, nn.Module):
    """A network in an ONNX file, run by onnxruntime on the CPU: float32 images in, float32 logits out."""

    def __init__(self, session: Any, info: ModelInfo, source: str) -> None:
        super().__init__()
        self.session, self.info, self.source = session, info, source
        self.input_name = session.get_inputs()[0].name

    def forward(self, inputs: Tensor) -> Tensor:
        array = inputs.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).to(inputs.device)

    def float_twin(self) -> RepVGG:
        """An untrained float deploy-form RepVGG of the file's architecture (to count its MACs, say)."""
        if self.info.module_type != "RepVGG" or self.info.config is None:
            raise CheckpointError(f"{self.source} records no RepVGG architecture, so it has no float twin.")
        return RepVGG(**self.info.config, deploy=True).eval()

    def extra_repr(self) -> str:
        return f"source={self.source}, precision={self.info.precision}"


def load_onnx(path: PathLike) -> OnnxModel:
    """The ONNX file at ``path`` as a model, labelled by its record (or by its shapes, for a foreign file)."""
    location = Path(path)
    if not location.is_file():
        raise CheckpointError(f"No ONNX file at {location}: check the path.")
    try:
        session = onnx_session(str(location))
    except ExportError:
        raise
    except Exception as error:  # onnxruntime's own error types: not an ONNX model it can run
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{location} is not an ONNX model onnxruntime can run ({first[:200]})."
        ) from error
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if metadata.get("config") or metadata.get("model_name"):
        info = ModelInfo.from_metadata(metadata)
        if info.module_type == "PSPNet":
            raise CheckpointError(
                f"{location} is a PSPNet's ONNX export, which runs with onnxruntime as it is; eval and "
                "predict take the PSPNet's .safetensors checkpoint."
            )
    else:
        info = _info_from_shapes(session, location)
    return OnnxModel(session, info, str(location))


def _info_from_shapes(session: Any, location: Path) -> ModelInfo:
    channels = session.get_inputs()[0].shape[1] if len(session.get_inputs()[0].shape) == 4 else None
    classes = session.get_outputs()[0].shape[1] if len(session.get_outputs()[0].shape) == 2 else None
    if not isinstance(channels, int) or not isinstance(classes, int):
        raise CheckpointError(
            f"{location} is not an image classifier this package can run: it needs an (N, C, H, W) input and "
            "an (N, classes) output."
        )
    config = {"num_classes": classes, "in_chans": channels}
    return ModelInfo(config=config, form="deploy", module_type="ONNX")
