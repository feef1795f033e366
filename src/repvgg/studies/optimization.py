"""``repvgg optimize``: find, for a checkpoint on this machine, the fastest way to run it that keeps its
accuracy, and write the artefact that runs that way.

Calibration images come from the training split and the judging images from the validation split, so the
guard is measured on images the calibration never saw. The artefact runs the way that won, in every command
that reads models: an ONNX file (with the model record in its metadata) when an onnxruntime candidate wins,
an INT8 checkpoint when the x86 engine's INT8 wins, else the deploy-form checkpoint (its weights in bfloat16
when bfloat16 wins) whose record names the backend and precision that won (``eval``, ``predict`` and
``bench`` then run it that way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from repvgg.core.info import model_info
from repvgg.core.int8 import QuantizedRepVGG
from repvgg.core.models import RepVGG
from repvgg.core.reparam import refuse_nonfinite, to_deploy_form
from repvgg.engine.data import build_data, calibration_images, collate_refusing_bad, default_workers
from repvgg.exceptions import InferenceError
from repvgg.io.checkpoints import load_checkpoint, require_kind, save_checkpoint, save_quantized
from repvgg.io.files import PathLike, atomic_write, refuse_same_file, writable_or_raise
from repvgg.runtime.device import resolve_device
from repvgg.runtime.export import onnx_with_record
from repvgg.runtime.optimize import Candidate, optimize

ARTEFACT_SUFFIXES = (".safetensors", ".onnx")


def winner_paths(output: PathLike, backend: str = "auto") -> list[Path]:
    """The files the winner of a search over ``backend`` may be written to: ``output`` with the suffix
    ``.onnx`` when an onnxruntime candidate can win, ``.safetensors`` when another can."""
    if Path(output).suffix not in ARTEFACT_SUFFIXES:
        raise InferenceError(
            f"`output` is a .safetensors or .onnx file (the winner sets which), got {Path(output).name}."
        )
    suffixes = [".safetensors"] * (backend != "onnxruntime") + [".onnx"] * (
        backend in ("auto", "onnxruntime")
    )
    return [Path(output).with_suffix(suffix) for suffix in suffixes]


@dataclass(frozen=True)
class OptimizeResult:
    """What ``repvgg optimize`` chose and wrote, with every candidate it weighed."""

    path: Path
    backend: str
    precision: str
    report: list[Candidate]
    reference_top1: float
    images: int


def optimize_checkpoint(
    checkpoint: PathLike,
    output: PathLike,
    *,
    data: str = "fashion-mnist",
    data_dir: str | None = None,
    precision: str = "auto",
    backend: str = "auto",
    max_top1_drop: float = 0.5,
    calib: int = 512,
    val_subset: int | None = None,
    batch_size: int = 64,
    image_size: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    repeats: int = 10,
    seed: int = 0,
    overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> OptimizeResult:
    """Search backends and precisions for ``checkpoint`` (see :func:`repvgg.optimize`), judging each on
    ``data``'s validation split, and write the winner to ``output``, whose suffix (``.safetensors`` or
    ``.onnx``) is set by the winner (:func:`winner_paths`). A file of the other suffix that the winner may
    replace, which the caller did not name, is refused before any work unless ``overwrite``. ``on_step`` is
    told each step as it begins (minutes in all)."""
    step = on_step or (lambda _: None)
    targets = winner_paths(output, backend)
    for target in targets:
        writable_or_raise(target, InferenceError)
        refuse_same_file(checkpoint, target, InferenceError)
    unnamed = [t for t in targets if t != Path(output) and t.exists()]
    if unnamed and not overwrite:
        raise InferenceError(
            f"{unnamed[0]} exists and would be replaced if the winner is written as {unnamed[0].suffix}; "
            "move it, choose another `output`, or replace it (`overwrite`)."
        )
    require_kind(checkpoint, ("classifier",), "the search (judged by top-1)", InferenceError)
    step(f"reading {checkpoint}")
    model = load_checkpoint(checkpoint)
    if isinstance(model, QuantizedRepVGG) or not isinstance(model, RepVGG):
        raise InferenceError(f"{checkpoint} is not a float RepVGG classifier: optimize its float checkpoint.")
    refuse_nonfinite(model, str(checkpoint), InferenceError)
    recorded = model.preprocessing.image_size if model.preprocessing else None
    size = image_size or (recorded if data == "imagefolder" else None)  # small sets: one native size
    step(f"reading {data}")
    bundle = build_data(data, data_dir, image_size=size, val_subset=val_subset, seed=seed)
    if (bundle.in_chans, bundle.num_classes) != (model.in_chans, model.num_classes):
        raise InferenceError(
            f"The model takes {model.in_chans}-channel images and has {model.num_classes} classes but {data} "
            f"has {bundle.in_chans} and {bundle.num_classes}: optimize it with the dataset it was trained on."
        )
    target = resolve_device(device, InferenceError)
    workers = default_workers(bundle) if workers is None else workers
    judged = DataLoader(bundle.val, batch_size, num_workers=workers, collate_fn=collate_refusing_bad)
    calibration = DataLoader(
        calibration_images(bundle, calib, seed),
        batch_size,
        num_workers=workers,
        collate_fn=collate_refusing_bad,
    )
    example = next(iter(judged))[0]
    chosen = optimize(
        model.eval(),
        backend,
        precision=precision,
        example_input=example,
        device=target,
        calibration=(images for images, _ in calibration) if target.type == "cpu" else None,
        eval_data=judged,
        max_top1_drop=max_top1_drop,
        repeats=repeats,
        on_step=step,
    )
    step(f"writing {chosen.backend}/{chosen.precision}")
    deployed, _ = to_deploy_form(model)
    if chosen.backend == "onnxruntime":
        path = Path(output).with_suffix(".onnx")
        info = model_info(deployed).replace(precision="int8" if chosen.precision == "int8" else "float32")
        payload = onnx_with_record(chosen.runner.onnx_payload, info)  # type: ignore[attr-defined]
        atomic_write(
            path, lambda target: target.write_bytes(payload), what="the ONNX model", error_type=InferenceError
        )
    elif chosen.precision == "int8":
        path = save_quantized(chosen.runner, Path(output).with_suffix(".safetensors"))  # type: ignore[arg-type]
    else:
        deployed.runtime = {"backend": chosen.backend, "precision": chosen.precision}
        if chosen.precision == "bf16":  # the weights it runs with, at half the size: it loads as float32
            deployed = deployed.to(torch.bfloat16)
        path = save_checkpoint(deployed, Path(output).with_suffix(".safetensors"))
    return OptimizeResult(
        Path(path),
        chosen.backend,
        chosen.precision,
        chosen.report,
        reference_top1=chosen.reference_top1,
        images=len(bundle.val),  # type: ignore[arg-type]
    )
