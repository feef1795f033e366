"""Running trained networks fast: ``optimize`` picks the fastest backend that reproduces the model.

``optimize`` turns any network (converted first if it holds training-form RepVGG blocks) into a
callable with the same outputs, run by one of several backends: PyTorch eager, TorchInductor with
frozen weights (oneDNN convolutions with fused ReLU on CPU, cuDNN on GPU), or onnxruntime. With
``backend="auto"`` every candidate is checked against eager PyTorch and timed on the example input,
and the fastest correct one is kept.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repvgg.core.info import model_info
from repvgg.core.int8 import QuantizedRepVGG
from repvgg.core.reparam import relative_error, to_deploy_form, tolerance_for
from repvgg.exceptions import InferenceError, RepVGGError
from repvgg.runtime.export import onnx_bytes, onnx_session
from repvgg.runtime.measure import time_interleaved
from repvgg.runtime.names import BACKEND_CHOICES, BACKENDS

HALF_DTYPES = (torch.float16, torch.bfloat16)

Runner = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _Setting:
    """Where and how a backend runs: device, dtype, and (for PyTorch backends) the memory format."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool

    def prepare(self, model: nn.Module) -> nn.Module:
        model = copy.deepcopy(model).to(self.device, self.dtype)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def place(self, inputs: Tensor) -> Tensor:
        inputs = inputs.to(self.device, self.dtype)
        return inputs.contiguous(memory_format=torch.channels_last) if self.channels_last else inputs


def _eager(model: nn.Module, setting: _Setting, example: Tensor) -> Runner:
    """PyTorch eager; channels_last lets oneDNN run the convolutions without reordering every layer."""
    prepared = setting.prepare(model)
    return lambda inputs: prepared(setting.place(inputs))


def _inductor(model: nn.Module, setting: _Setting, example: Tensor) -> Runner:
    """TorchInductor with frozen weights: constant-folded, prepacked oneDNN convolutions fused with ReLU
    on CPU; the conversion to a plain conv stack is what makes this fusion apply to every layer."""
    # Inductor's C++ toolchain probe logs "No CUDA runtime is found" on CPU-only machines: not news here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    compiled = torch.compile(setting.prepare(model), options={"freezing": True})
    with torch.inference_mode():
        compiled(setting.place(example))  # compile now, not on the user's first call
    return lambda inputs: compiled(setting.place(inputs))


def _onnxruntime(model: nn.Module, setting: _Setting, example: Tensor) -> Runner:
    """onnxruntime with every graph optimization (its own blocked layout: inputs stay NCHW float32)."""
    if setting.dtype != torch.float32:
        raise InferenceError("The onnxruntime backend runs float32 only; use dtype=torch.float32 for it.")
    cpu_model = copy.deepcopy(model).float().cpu()
    payload = onnx_bytes(cpu_model, example.float().cpu().contiguous())
    session = onnx_session(payload, device=setting.device.type)
    input_name = session.get_inputs()[0].name

    def run(inputs: Tensor) -> Tensor:
        array = inputs.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(session.run(None, {input_name: array})[0]).to(inputs.device)

    return run


_BUILDERS: dict[str, Callable[[nn.Module, _Setting, Tensor], Runner]] = {
    "eager": _eager,
    "inductor": _inductor,
    "onnxruntime": _onnxruntime,
}


class OptimizedModel(nn.Module):
    """A deploy-form network run by one backend; call it like the model (any device, dtype, layout).

    ``backend`` is the backend chosen; ``max_rel_error`` its largest relative difference from eager
    float32 PyTorch on the example input; ``timings`` the median seconds per example batch of every
    candidate timed (``auto`` only); ``skipped`` why other candidates were not used.
    """

    def __init__(
        self,
        backend: str,
        runner: Runner,
        setting: _Setting,
        *,
        max_rel_error: float,
        timings: dict[str, float],
        skipped: dict[str, str],
        source: nn.Module,
    ) -> None:
        super().__init__()
        self.backend = backend
        self._runner = runner
        self._setting = setting
        self.max_rel_error = max_rel_error
        self.timings = timings
        self.skipped = skipped
        self.info = model_info(source)

    def forward(self, inputs: Tensor) -> Tensor:
        # Always inference mode, whatever the caller's: a compiled graph is specialised to the grad mode.
        with torch.inference_mode():
            return self._runner(inputs).float()

    def extra_repr(self) -> str:
        return f"backend={self.backend}, dtype={self._setting.dtype}, device={self._setting.device}"


def optimize(
    model: nn.Module,
    backend: str = "auto",
    *,
    example_input: Tensor,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    channels_last: bool = True,
    repeats: int = 5,
) -> OptimizedModel:
    """The fastest way we have to run ``model``, with the same outputs.

    The model is copied, put in eval mode and re-parameterized if it holds training-form RepVGG blocks.
    ``backend`` is ``eager``, ``inductor``, ``onnxruntime``, or ``auto``: build each, drop any whose
    output on ``example_input`` differs from eager float32 by more than the one tolerance table allows
    for ``dtype`` (``repvgg.core.reparam.TOLERANCE``) or that cannot run here, time the rest on
    ``example_input`` (interleaved medians) and keep the fastest. ``dtype`` may be float16/bfloat16 on
    CUDA, where cuDNN's benchmark mode is enabled.
    """
    if backend not in BACKEND_CHOICES:
        raise InferenceError(f"Unknown backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}.")
    target = torch.device(device) if device is not None else example_input.device
    if dtype in HALF_DTYPES and target.type != "cuda":
        raise InferenceError(
            f"{str(dtype).removeprefix('torch.')} inference is for CUDA; on the CPU use float32."
        )
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True
    setting = _Setting(target, dtype, channels_last)
    if isinstance(model, QuantizedRepVGG):
        return _int8_runner(model, backend, setting)
    deployed, _ = to_deploy_form(model)
    example = example_input.to(target)
    with torch.inference_mode():
        reference = deployed.float().to(target)(example.float()).float()
    names = BACKENDS if backend == "auto" else (backend,)
    runners: dict[str, Runner] = {}
    errors: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            runner = _BUILDERS[name](deployed, setting, example)
            with torch.inference_mode():
                error = relative_error(runner(example).float(), reference)
        except RepVGGError as failure:
            skipped[name] = str(failure)
            continue
        except Exception as failure:  # a compiler or runtime missing on this machine fails in many ways
            skipped[name] = f"{type(failure).__name__}: {str(failure).strip().splitlines()[0][:200]}"
            continue
        if error > tolerance_for(dtype):
            skipped[name] = f"outputs differ from eager PyTorch by {error:.1e} (relative)"
            continue
        runners[name], errors[name] = runner, error
    if not runners:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise InferenceError(f"No backend could run this model here ({reasons}).")
    timings: dict[str, float] = {}
    if len(runners) > 1:
        with torch.inference_mode():
            measured = time_interleaved(runners, example, rounds=repeats)
        timings = {name: result.median_s for name, result in measured.items()}
        chosen = min(timings, key=timings.__getitem__)
    else:
        chosen = next(iter(runners))
    return OptimizedModel(
        chosen,
        runners[chosen],
        setting,
        max_rel_error=errors[chosen],
        timings=timings,
        skipped=skipped,
        source=model,
    )


def _int8_runner(model: QuantizedRepVGG, backend: str, setting: _Setting) -> OptimizedModel:
    """INT8 networks have one way to run: the x86 quantized engine, on the CPU, in float32 in and out."""
    if backend not in ("auto", "eager") or setting.device.type != "cpu" or setting.dtype != torch.float32:
        raise InferenceError(
            "An INT8 model runs only on the CPU with the x86 quantized engine: use `backend` eager (or "
            "auto), `device` cpu and float32 input."
        )
    return OptimizedModel("int8-x86", model, setting, max_rel_error=0.0, timings={}, skipped={}, source=model)
