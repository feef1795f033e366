"""Running trained networks fast: backends (``optimize``), prediction on image files, evaluation.

``optimize`` turns any network (converted first if it holds training-form RepVGG blocks) into a
callable with the same outputs, run by one of several backends: PyTorch eager, TorchInductor with
frozen weights (oneDNN convolutions with fused ReLU on CPU, cuDNN on GPU), or onnxruntime. With
``backend="auto"`` every candidate is checked against eager PyTorch and timed on the example input,
and the fastest correct one is kept.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.benchmark import compare_throughput
from repvgg.checkpoints import PathLike, load_checkpoint
from repvgg.data import PREPROCESSING_PRESETS, BadImage, Preprocessing, build_data, default_workers
from repvgg.deploy import onnx_bytes, onnx_session, relative_difference, to_deploy_form
from repvgg.distributed import init_distributed
from repvgg.evaluation import EvalResult, eval_loader, evaluate
from repvgg.exceptions import DataError, InferenceError, RepVGGError, TrainingError
from repvgg.models import RepVGG
from repvgg.quantization import QuantizedRepVGG
from repvgg.training import AMP_DTYPES

BACKENDS = ("eager", "inductor", "onnxruntime")
BACKEND_CHOICES = ("auto", *BACKENDS)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _tolerance(dtype: torch.dtype) -> float:
    """Outputs must match eager float32 to 1e-4 (relative) in float32; half precision rounds more."""
    return 1e-4 if dtype == torch.float32 else 2e-2


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
        self.class_names: list[str] | None = getattr(source, "class_names", None)
        self.preprocessing: dict[str, Any] | None = getattr(source, "preprocessing", None)
        self.in_chans: int = getattr(source, "in_chans", 3)

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
    output on ``example_input`` differs from eager float32 by more than 1e-4 (relative; 2e-2 in half
    precision) or that cannot run here, time the rest on ``example_input`` (interleaved medians) and
    keep the fastest. ``dtype`` may be float16/bfloat16 on CUDA, where cuDNN's benchmark mode is enabled.
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
                error = relative_difference(runner(example).float(), reference)
        except RepVGGError as failure:
            skipped[name] = str(failure)
            continue
        except Exception as failure:  # a compiler or runtime missing on this machine fails in many ways
            skipped[name] = f"{type(failure).__name__}: {str(failure).strip().splitlines()[0][:200]}"
            continue
        if error > _tolerance(dtype):
            skipped[name] = f"outputs differ from eager PyTorch by {error:.1e} (relative)"
            continue
        runners[name], errors[name] = runner, error
    if not runners:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise InferenceError(f"No backend could run this model here ({reasons}).")
    timings: dict[str, float] = {}
    if len(runners) > 1:
        with torch.inference_mode():
            measured = compare_throughput(runners, example, repeats=repeats)
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
            "An INT8 model runs only on the CPU with the x86 quantized engine: use --backend eager (or "
            "auto), --device cpu and float32 input."
        )
    return OptimizedModel("int8-x86", model, setting, max_rel_error=0.0, timings={}, skipped={}, source=model)


@dataclass(frozen=True)
class Prediction:
    """The ``topk`` most likely classes of one image, most likely first, as (label, probability)."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)


def resolve_preprocessing(model: nn.Module, preset: str | None = None) -> Preprocessing:
    """The preprocessing saved with the model, unless a preset (a dataset name) is asked for."""
    if preset is not None:
        if preset not in PREPROCESSING_PRESETS:
            raise DataError(
                f"Unknown preprocessing {preset!r}: choose one of {', '.join(PREPROCESSING_PRESETS)}."
            )
        chosen = PREPROCESSING_PRESETS[preset]
    elif getattr(model, "preprocessing", None):
        chosen = Preprocessing.from_dict(model.preprocessing)  # type: ignore[arg-type]
    else:
        chosen = PREPROCESSING_PRESETS["imagenet"]
    in_chans = getattr(model, "in_chans", 3)
    if chosen.in_chans != in_chans:
        raise DataError(
            f"The model takes {in_chans}-channel images but the preprocessing "
            f"{'asked for' if preset else 'assumed (the checkpoint records none)'} has {chosen.in_chans}; "
            f"pass --preprocessing with one of {', '.join(PREPROCESSING_PRESETS)}."
        )
    return chosen


def read_image(path: PathLike, in_chans: int, transform: Callable[[Any], Tensor]) -> Tensor | BadImage:
    """One image file as a model input, or a :class:`BadImage` saying why it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("L" if in_chans == 1 else "RGB")
    except Exception as error:  # PIL raises many types for damaged or foreign files
        return BadImage(str(path), f"{type(error).__name__}: {error}")
    return transform(image)


def predict(
    source: PathLike | nn.Module,
    images: Sequence[PathLike],
    *,
    topk: int = 5,
    batch_size: int = 32,
    backend: str = "eager",
    preprocessing: str | None = None,
    device: str | None = None,
) -> tuple[list[Prediction], list[BadImage]]:
    """Top-k classes of each readable image, in batches; unreadable images are returned, not raised.

    ``source`` is a checkpoint (any format the package reads) or a model. Class names and the
    preprocessing come from the checkpoint; ``preprocessing`` names a preset to use instead.
    """
    if topk < 1 or batch_size < 1:
        raise InferenceError("--topk and --batch-size must be at least 1.")
    model = load_checkpoint(source) if not isinstance(source, nn.Module) else source
    prepare = resolve_preprocessing(model, preprocessing)
    in_chans = getattr(model, "in_chans", 3)
    transform = prepare.transform()
    default = "cuda" if torch.cuda.is_available() and not isinstance(model, QuantizedRepVGG) else "cpu"
    target = torch.device(device or default)
    runner: nn.Module | None = None
    predictions: list[Prediction] = []
    bad: list[BadImage] = []
    for start in range(0, len(images), batch_size):
        chunk = [(str(p), read_image(p, in_chans, transform)) for p in images[start : start + batch_size]]
        bad += [item for _, item in chunk if isinstance(item, BadImage)]
        good = [(path, item) for path, item in chunk if not isinstance(item, BadImage)]
        if not good:
            continue
        batch = torch.stack([item for _, item in good]).to(target)
        if runner is None:
            runner = optimize(model, backend, example_input=batch, device=target)
        with torch.inference_mode():
            probabilities = runner(batch).softmax(dim=1).cpu()
        names = getattr(model, "class_names", None) or [str(i) for i in range(probabilities.shape[1])]
        values, indices = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
        for (path, _), row_values, row_indices in zip(good, values, indices, strict=True):
            top = [(names[int(i)], float(v)) for v, i in zip(row_values, row_indices, strict=True)]
            predictions.append(Prediction(path, top))
    return predictions, bad


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str = "fashion-mnist",
    data_dir: str | None = None,
    batch_size: int = 256,
    val_subset: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    amp: str = "none",
    backend: str | None = None,
) -> EvalResult:
    """Top-1/top-5 of a checkpoint (any format :func:`repvgg.load_checkpoint` reads) on a validation set.

    Without ``backend`` the checkpoint is evaluated as stored, in eager PyTorch; with one, it is first
    converted and run by :func:`optimize` (timed on one batch of the validation set).
    """
    if amp not in AMP_DTYPES:
        raise TrainingError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}.")
    model = load_checkpoint(checkpoint)
    assert isinstance(model, RepVGG | QuantizedRepVGG)
    if isinstance(model, QuantizedRepVGG):
        if (device or "cpu") != "cpu" or amp != "none":
            raise InferenceError("An INT8 model is evaluated on the CPU without --amp: drop those flags.")
        device = "cpu"
    bundle = build_data(data, data_dir, val_subset=val_subset)
    if model.in_chans != bundle.in_chans:
        raise DataError(
            f"The model takes {model.in_chans}-channel images but {data} has {bundle.in_chans} channels; "
            "evaluate it on the dataset it was trained for."
        )
    if model.num_classes != bundle.num_classes:
        raise DataError(
            f"The model has {model.num_classes} classes but {data} has {bundle.num_classes}; evaluate it on "
            "the dataset it was trained for."
        )
    context = init_distributed(device)
    model = model.to(context.device)
    if workers is None:
        workers = default_workers(bundle)
    loader = eval_loader(bundle.val, batch_size, workers, context)

    def refuse(bad: list[BadImage]) -> None:
        raise bad[0].error("fix or remove it")

    runner: nn.Module = model
    if backend is not None:
        images, _, bad = next(iter(loader))
        if bad:
            refuse(bad)
        runner = optimize(model, backend, example_input=images.to(context.device))
    return evaluate(runner, loader, context, amp_dtype=AMP_DTYPES[amp], on_bad_images=refuse)
