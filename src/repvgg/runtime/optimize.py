"""Running trained networks fast: ``optimize`` picks the fastest backend (and precision) that keeps the model.

``optimize`` turns any network (converted first if it holds training-form RepVGG blocks) into a
callable with the same outputs, run by one of several backends: PyTorch eager, TorchInductor with
frozen weights (oneDNN convolutions with fused ReLU on CPU, cuDNN on GPU), or onnxruntime. With
``backend="auto"`` every candidate is checked against eager PyTorch and timed on the example input,
and the fastest correct one is kept.

With ``precision`` other than fp32 the candidates include bfloat16 (on CUDA, and on CPUs whose instructions
make it fast: avx512_bf16 or AMX, detected) and INT8 (the x86 engine, calibrated on the images given). Their
outputs are not the float32 ones, so they are judged on held-out labelled images instead: each candidate's
top-1 and its agreement with float32's predictions, against a guard on the top-1 drop.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.core import arguments
from repvgg.core.info import model_info
from repvgg.core.int8 import QuantizedRepVGG, quantize_ptq
from repvgg.core.reparam import relative_error, to_deploy_form, tolerance_for
from repvgg.exceptions import ArgumentTypeError, ArgumentValueError, InferenceError, RepVGGError
from repvgg.io.machine import cpu_features, int8_activation_bits
from repvgg.io.onnxfile import OnnxModel, onnx_session
from repvgg.runtime.export import onnx_bytes
from repvgg.runtime.measure import time_interleaved
from repvgg.runtime.names import BACKEND_CHOICES, BACKENDS, PRECISION_CHOICES

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
    return _onnx_runner(payload, model, setting.device.type)


def _onnx_runner(payload: bytes, model: nn.Module, device: str = "cpu") -> OnnxModel:
    """An onnxruntime session of ``payload`` run like ``model``; it keeps the payload, which is what
    ``repvgg optimize`` writes when it wins."""
    runner = OnnxModel(onnx_session(payload, device=device), model_info(model), "the exported graph")
    runner.onnx_payload = payload
    return runner


_BUILDERS: dict[str, Callable[[nn.Module, _Setting, Tensor], Runner]] = {
    "eager": _eager,
    "inductor": _inductor,
    "onnxruntime": _onnxruntime,
}


@dataclass
class Candidate:
    """One way to run the model that ``optimize`` considered: a row of :attr:`OptimizedModel.report`.

    ``top1`` and ``agreement`` (the share of held-out images whose predicted class equals float32 eager's)
    are percentages; ``top1_drop`` is float32's top-1 minus this one's. ``why_not`` says why it was not
    chosen (None for the one chosen).
    """

    backend: str
    precision: str
    images_per_s: float | None = None
    top1: float | None = None
    top1_drop: float | None = None
    agreement: float | None = None
    why_not: str | None = None


class OptimizedModel(nn.Module):
    """A deploy-form network run by one backend; call it like the model (any device, dtype, layout).

    ``backend`` is the backend chosen and ``precision`` its precision; ``max_rel_error`` its largest
    relative difference from eager float32 PyTorch on the example input (NaN for bf16 and int8, which are
    judged by their top-1 instead); ``timings`` the median seconds per
    example batch of every candidate timed (``auto`` only); ``skipped`` why other candidates were not used;
    ``report`` (with a ``precision`` search) every candidate's speed, accuracy and fate.
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
        precision: str = "fp32",
        report: list[Candidate] | None = None,
        reference_top1: float | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.precision = precision
        self.report = report or []
        self.reference_top1 = reference_top1  # eager float32's top-1 on the held-out images
        self._runner = runner
        self._setting = setting
        self.max_rel_error = max_rel_error
        self.timings = timings
        self.skipped = skipped
        self.info = model_info(source)

    @property
    def runner(self) -> Runner:
        """What runs the model: a module (eager, INT8) or a compiled or onnxruntime callable."""
        return self._runner

    def forward(self, inputs: Tensor) -> Tensor:
        # Always inference mode, whatever the caller's: a compiled graph is specialised to the grad mode.
        with torch.inference_mode():
            return self._runner(inputs).float()

    def extra_repr(self) -> str:
        return f"backend={self.backend}, precision={self.precision}, device={self._setting.device}"


def optimize(
    model: nn.Module,
    backend: str = "auto",
    *,
    example_input: Tensor,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    channels_last: bool = True,
    repeats: int = 5,
    precision: str = "fp32",
    calibration: Iterable[Tensor] | None = None,
    eval_data: Iterable[Sequence[Tensor]] | None = None,
    max_top1_drop: float = 0.5,
    on_step: Callable[[str], None] | None = None,
) -> OptimizedModel:
    """The fastest way we have to run ``model``, with the same outputs (or, with ``precision``, the same
    accuracy).

    The model is copied, put in eval mode and re-parameterized if it holds training-form RepVGG blocks.
    ``backend`` is ``eager``, ``inductor``, ``onnxruntime``, or ``auto``: build each, drop any whose
    output on ``example_input`` differs from eager float32 by more than the one tolerance table allows
    for ``dtype`` (``repvgg.core.reparam.TOLERANCE``) or that cannot run here, time the rest on
    ``example_input`` (interleaved medians) and keep the fastest. ``dtype`` may be float16/bfloat16 on
    CUDA, where cuDNN's benchmark mode is enabled.

    ``precision`` ``bf16``, ``int8`` or ``auto`` (all three) searches precisions too (see the module's
    docstring): ``eval_data`` (a re-iterable of ``(images, labels, ...)`` batches, held out from training)
    judges every candidate, which must lose at most ``max_top1_drop`` points of float32's top-1;
    ``calibration`` (batches of training images) calibrates INT8. The fastest candidate that passes is
    kept, and :attr:`OptimizedModel.report` lists them all.

    ``on_step`` is told each step as it begins (a candidate built, checked, judged; the timing), e.g. a
    :class:`repvgg.runtime.progress.StepProgress`: a search can take minutes.
    """
    step = on_step or (lambda _: None)
    _check_model_and_example(model, example_input)
    if backend not in BACKEND_CHOICES:
        raise InferenceError(f"Unknown backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}.")
    if precision not in PRECISION_CHOICES:
        raise InferenceError(
            f"Unknown precision {precision!r}: choose one of {', '.join(PRECISION_CHOICES)}."
        )
    if precision != "fp32":
        return _search_precisions(
            model,
            backend,
            precision,
            example_input=example_input,
            device=torch.device(device) if device is not None else example_input.device,
            channels_last=channels_last,
            repeats=repeats,
            calibration=calibration,
            eval_data=eval_data,
            max_top1_drop=max_top1_drop,
            step=step,
        )
    target = torch.device(device) if device is not None else example_input.device
    cpu_bf16 = dtype == torch.bfloat16 and cpu_features()["fast_bf16"]
    if dtype in HALF_DTYPES and target.type != "cuda" and not cpu_bf16:
        raise InferenceError(
            f"{str(dtype).removeprefix('torch.')} inference is for CUDA and for CPUs with bfloat16 "
            "instructions (avx512_bf16 or AMX); on this CPU use float32."
        )
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True
    setting = _Setting(target, dtype, channels_last)
    if isinstance(model, QuantizedRepVGG | OnnxModel):
        return _as_it_is(model, backend, setting)
    deployed, _ = to_deploy_form(model)
    example = example_input.to(target)
    with torch.inference_mode():
        reference = deployed.float().to(target)(example.float()).float()
    names = BACKENDS if backend == "auto" else (backend,)
    runners: dict[str, Runner] = {}
    errors: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in names:
        step(f"building and checking {name}")
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
        step(f"timing {', '.join(runners)} ({repeats} rounds)")
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
        precision={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
    )


def _as_it_is(model: QuantizedRepVGG | OnnxModel, backend: str, setting: _Setting) -> OptimizedModel:
    """INT8 networks and ONNX files have one way to run: the x86 quantized engine or onnxruntime, on the
    CPU, in float32 in and out."""
    engine = "int8-x86" if isinstance(model, QuantizedRepVGG) else "onnxruntime"
    if (
        backend not in ("auto", "eager", engine)
        or setting.device.type != "cpu"
        or setting.dtype != torch.float32
    ):
        raise InferenceError(
            f"{'An INT8 model' if engine == 'int8-x86' else 'An ONNX file'} runs one way, on the CPU: use "
            "`backend` auto, `device` cpu and float32 input."
        )
    precision = "int8" if model_info(model).precision == "int8" else "fp32"
    return OptimizedModel(
        engine, model, setting, max_rel_error=0.0, timings={}, skipped={}, source=model, precision=precision
    )


class AsRecorded(nn.Module):
    """A model run the way its record says ``repvgg optimize`` found fastest, built on its first batch (the
    example a compiled backend needs); a model without such a record runs as it is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.way = model, recorded_runtime(model)
        self.info = model_info(model)
        self._runner: OptimizedModel | None = None

    def forward(self, inputs: Tensor) -> Tensor:
        if self.way is None:
            return self.model(inputs)
        if self._runner is None:
            backend, dtype = self.way
            self._runner = optimize(self.model, backend, example_input=inputs, dtype=dtype)
        return self._runner(inputs)


def _search_precisions(
    model: nn.Module,
    backend: str,
    precision: str,
    *,
    example_input: Tensor,
    device: torch.device,
    channels_last: bool,
    repeats: int,
    calibration: Iterable[Tensor] | None,
    eval_data: Iterable[Sequence[Tensor]] | None,
    max_top1_drop: float,
    step: Callable[[str], None],
) -> OptimizedModel:
    """Build every candidate of the precisions asked for, score each on ``eval_data``, time those that
    keep float32's accuracy, keep the fastest; ``step`` is told each step as it begins."""
    if eval_data is None:
        raise InferenceError(
            "Choosing a precision needs held-out labelled images (`eval_data`) to check each candidate's "
            "top-1 against float32's; give them, or use `precision` fp32."
        )
    if not 0 <= max_top1_drop <= 100:  # top-1 is a percentage: a larger drop is no guard at all
        raise InferenceError(f"`max_top1_drop` must be from 0 to 100 points, got {max_top1_drop}.")
    if isinstance(model, QuantizedRepVGG):
        raise InferenceError("The model is INT8 already; choose a precision for its float checkpoint.")
    deployed, _ = to_deploy_form(model)
    deployed = deployed.float().eval()
    example = example_input.to(device)
    wanted = ("fp32", "bf16", "int8") if precision == "auto" else ("fp32", precision)
    if calibration is not None:
        calibration = [batch.float().cpu() for batch in calibration]  # both INT8 candidates read it
    options = _candidates(deployed, backend, wanted, device, channels_last, calibration, example)
    candidates: dict[str, tuple[Candidate, Runner | None]] = {}
    for candidate, build in options:
        key = f"{candidate.backend}/{candidate.precision}"
        if candidate.why_not is None:
            step(f"building {key}" + (" (calibrating)" if candidate.precision == "int8" else ""))
        candidates[key] = (candidate, _build(candidate, build))
    fp32_eager = _eager(deployed, _Setting(device, torch.float32, channels_last), example)
    step("checking the float32 candidates' outputs")
    errors = _check_float32(candidates, fp32_eager, example)
    reference_top1 = _judge(candidates, fp32_eager, eval_data, device, max_top1_drop, step)
    passing = {
        key: runner for key, (candidate, runner) in candidates.items() if runner and not candidate.why_not
    }
    if not passing:
        reasons = "; ".join(f"{key}: {c.why_not}" for key, (c, _) in candidates.items())
        raise InferenceError(f"No candidate could run this model within the guard here ({reasons}).")
    step(f"timing {', '.join(passing)} ({repeats} rounds)")
    with torch.inference_mode():
        measured = time_interleaved(passing, example, rounds=repeats)
    for key, throughput in measured.items():
        candidates[key][0].images_per_s = throughput.images_per_s
    chosen = max(measured, key=lambda key: measured[key].images_per_s)
    for key, (candidate, _) in candidates.items():
        if key != chosen and candidate.why_not is None:
            candidate.why_not = (
                f"slower ({candidate.images_per_s:.0f} vs {measured[chosen].images_per_s:.0f} images/s)"
            )
    winner = candidates[chosen][0]
    return OptimizedModel(
        winner.backend,
        candidates[chosen][1],  # type: ignore[arg-type]
        _Setting(device, _DTYPES[winner.precision], channels_last),
        max_rel_error=errors.get(chosen, float("nan")),  # other precisions are judged by top-1 instead
        timings={key: throughput.median_s for key, throughput in measured.items()},
        skipped={key: c.why_not for key, (c, _) in candidates.items() if c.why_not},
        source=model,
        precision=winner.precision,
        report=[candidate for candidate, _ in candidates.values()],
        reference_top1=reference_top1,
    )


def _build(candidate: Candidate, build: Callable[[], Runner]) -> Runner | None:
    """The candidate's runner, or None with the reason in ``candidate.why_not``."""
    if candidate.why_not is not None:
        return None
    try:
        return build()
    except Exception as failure:  # a compiler or runtime missing here fails in many ways
        candidate.why_not = f"{type(failure).__name__}: {str(failure).strip().splitlines()[0][:200]}"
        return None


def _check_float32(
    candidates: dict[str, tuple[Candidate, Runner | None]], reference: Runner, example: Tensor
) -> dict[str, float]:
    """Float32 candidates must reproduce eager float32's outputs (the one tolerance table's bound)."""
    with torch.inference_mode():
        expected = reference(example).float()
    errors = {}
    for key, (candidate, runner) in candidates.items():
        if runner is not None and candidate.precision == "fp32":
            with torch.inference_mode():
                errors[key] = relative_error(runner(example).float(), expected)
            if errors[key] > tolerance_for(torch.float32):
                candidate.why_not = f"outputs differ from eager PyTorch by {errors[key]:.1e} (relative)"
    return errors


def _judge(
    candidates: dict[str, tuple[Candidate, Runner | None]],
    reference: Runner,
    eval_data: Iterable[Sequence[Tensor]],
    device: torch.device,
    max_top1_drop: float,
    step: Callable[[str], None],
) -> float:
    """Score every runnable candidate on ``eval_data`` against eager float32 (returned: its top-1); those
    that lose more than ``max_top1_drop`` points say so."""
    step("judging eager/fp32, the reference")
    reference_top1, reference_predictions = _score(reference, eval_data, device)
    for key, (candidate, runner) in candidates.items():
        if runner is None or candidate.why_not is not None:
            continue
        step(f"judging {key}")
        top1, predictions = _score(runner, eval_data, device)
        candidate.top1, candidate.top1_drop = top1, reference_top1 - top1
        candidate.agreement = 100.0 * float((predictions == reference_predictions).float().mean())
        if candidate.top1_drop > max_top1_drop:
            candidate.why_not = f"top-1 drops {candidate.top1_drop:.2f} points (guard {max_top1_drop:g})"
    return reference_top1


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


def recorded_runtime(model: nn.Module) -> tuple[str, torch.dtype] | None:
    """The backend and dtype ``repvgg optimize`` recorded in the model's record, if any."""
    runtime = model_info(model).runtime
    if not runtime:
        return None
    if runtime["backend"] not in BACKENDS or runtime["precision"] not in ("fp32", "bf16"):
        raise InferenceError(
            f"The checkpoint records an unknown way to run it ({runtime}); give `backend` yourself."
        )
    return runtime["backend"], _DTYPES[runtime["precision"]]


def _candidates(
    deployed: nn.Module,
    backend: str,
    precisions: Sequence[str],
    device: torch.device,
    channels_last: bool,
    calibration: Iterable[Tensor] | None,
    example: Tensor,
) -> list[tuple[Candidate, Callable[[], Runner]]]:
    """Every (backend, precision) to try, with how to build it; those that cannot run here say why."""
    backends = BACKENDS if backend == "auto" else (backend,)
    found: list[tuple[Candidate, Callable[[], Runner]]] = []
    for name in backends:
        fp32 = _Setting(device, torch.float32, channels_last)
        found.append((Candidate(name, "fp32"), functools.partial(_BUILDERS[name], deployed, fp32, example)))
    if "bf16" in precisions:
        fast = device.type == "cuda" or cpu_features()["fast_bf16"]
        for name in (b for b in backends if b != "onnxruntime"):
            bf16 = _Setting(device, torch.bfloat16, channels_last)
            candidate = Candidate(name, "bf16")
            if not fast:
                candidate.why_not = "this CPU has no bfloat16 instructions (avx512_bf16 or AMX)"
            found.append((candidate, functools.partial(_BUILDERS[name], deployed, bf16, example)))
    if "int8" in precisions:
        int8_backends: dict[str, Callable[[], Runner]] = {}
        if backend in ("auto", "eager"):  # the x86 engine's quantized kernels run in eager PyTorch
            bits = int8_activation_bits()
            int8_backends["x86"] = lambda: quantize_ptq(deployed, calibration or [], activation_bits=bits)  # type: ignore[arg-type]
        if backend in ("auto", "onnxruntime"):
            int8_backends["onnxruntime"] = lambda: onnxruntime_int8(deployed, calibration or [], example)
        for name, build in int8_backends.items():
            candidate = Candidate(name, "int8")
            if device.type != "cpu":
                candidate.why_not = "these INT8 kernels run on the CPU"
            elif calibration is None:
                candidate.why_not = "no calibration images were given (`calibration`)"
            found.append((candidate, build))
    return found


def onnxruntime_int8(
    model: nn.Module, calibration: Sequence[Tensor], example: Tensor, method: str = "minmax"
) -> Runner:
    """onnxruntime's static INT8 quantization (QDQ: int8 weights per channel, uint8 activations calibrated on
    ``calibration`` by ``method``: minmax, entropy or percentile), run by its CPU kernels (VNNI where the
    CPU has it)."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise InferenceError(f"Unknown calibration method {method!r}: choose one of {', '.join(methods)}.")

    class Batches(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.float().cpu().numpy()}

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(onnx_bytes(model, example.float().cpu().contiguous()))
        logging.disable(logging.WARNING)  # its advice to pre-process the graph, on the root logger
        try:
            quantize_static(
                str(source),
                str(target),
                Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
            )
        finally:
            logging.disable(logging.NOTSET)
        payload = target.read_bytes()
    return _onnx_runner(payload, model)


def _check_model_and_example(model: Any, example: Any) -> None:
    """``model`` a module and ``example`` a float batch of images with the model's channels (when its record
    says them), refused before any backend is built."""
    arguments.module(model, "model")
    if not isinstance(example, Tensor):
        raise ArgumentTypeError(
            f"`example_input` must be a tensor, a batch of images (N, C, H, W), got {type(example).__name__}."
        )
    if example.ndim != 4 or not example.is_floating_point():
        raise ArgumentValueError(
            f"`example_input` must be a floating-point batch of images (N, C, H, W), got shape "
            f"{tuple(example.shape)} of {str(example.dtype).removeprefix('torch.')}."
        )
    info = model_info(model)
    if info.config is not None and example.shape[1] != info.in_chans:
        raise ArgumentValueError(
            f"`example_input` has {example.shape[1]} channels but the model takes {info.in_chans}-channel "
            "images."
        )


def _check_labels(labels: Any, classes: int) -> None:
    """Labels of ``eval_data``: integer class indices of the model's classes."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        kind = (
            str(labels.dtype).removeprefix("torch.") if isinstance(labels, Tensor) else type(labels).__name__
        )
        raise ArgumentValueError(f"`eval_data` labels must be class indices (an integer tensor), got {kind}.")
    outside = labels[(labels < 0) | (labels >= classes)]
    if len(outside):
        raise ArgumentValueError(
            f"`eval_data` holds the label {int(outside[0])} but the model has {classes} classes (0 to "
            f"{classes - 1}): give the labels of the model's classes."
        )


def _score(runner: Runner, batches: Iterable[Sequence[Tensor]], device: torch.device) -> tuple[float, Tensor]:
    """Top-1 (percent) of ``runner`` over labelled batches, and its predicted class for every image."""
    predictions, correct, count = [], 0, 0
    with torch.inference_mode():
        for batch in batches:
            images, labels = batch[0], batch[1]
            if len(labels) == 0:
                continue
            logits = runner(images.to(device)).float()
            _check_labels(labels, logits.shape[1])
            predicted = logits.argmax(1).cpu()
            predictions.append(predicted)
            correct += int((predicted == labels.cpu()).sum())
            count += len(labels)
    if count == 0:
        raise InferenceError("`eval_data` held no images; give held-out labelled batches.")
    return 100.0 * correct / count, torch.cat(predictions)
