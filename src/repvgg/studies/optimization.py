"""``repvgg optimize``: find, for a checkpoint on this machine, the fastest way to run it that keeps its
accuracy, and write the artefact that runs that way.

Calibration images come from the training split and the judging images from the validation split, so the
guard is measured on images the calibration never saw. The artefact is one of this package's checkpoints:
an INT8 file when INT8 wins, else the deploy-form float checkpoint whose record names the backend and
precision that won (``eval`` and ``predict`` then run it that way unless told otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader

from repvgg.core.int8 import QuantizedRepVGG
from repvgg.core.models import RepVGG
from repvgg.core.reparam import refuse_nonfinite, to_deploy_form
from repvgg.engine.data import build_data, calibration_images, collate_refusing_bad, default_workers
from repvgg.exceptions import InferenceError
from repvgg.io.checkpoints import load_checkpoint, save_checkpoint, save_quantized
from repvgg.io.files import PathLike, refuse_same_file, writable_or_raise
from repvgg.runtime.device import resolve_device
from repvgg.runtime.optimize import Candidate, optimize


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
) -> OptimizeResult:
    """Search backends and precisions for ``checkpoint`` (see :func:`repvgg.optimize`), judging each on
    ``data``'s validation split, and write the winner to ``output`` (a ``.safetensors`` file)."""
    writable_or_raise(output, InferenceError)
    refuse_same_file(checkpoint, output, InferenceError)
    if Path(output).suffix != ".safetensors":
        raise InferenceError(f"`output` is a checkpoint: name it with .safetensors, got {Path(output).name}.")
    model = load_checkpoint(checkpoint)
    if isinstance(model, QuantizedRepVGG) or not isinstance(model, RepVGG):
        raise InferenceError(f"{checkpoint} is not a float RepVGG classifier: optimize its float checkpoint.")
    refuse_nonfinite(model, str(checkpoint), InferenceError)
    recorded = model.preprocessing.image_size if model.preprocessing else None
    size = image_size or (recorded if data == "imagefolder" else None)  # small sets: one native size
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
    )
    if chosen.precision == "int8":
        save_quantized(chosen.runner, output)  # type: ignore[arg-type]
    else:
        deployed, _ = to_deploy_form(model)
        deployed.runtime = {"backend": chosen.backend, "precision": chosen.precision}
        save_checkpoint(deployed, output)
    eager = next(row for row in chosen.report if (row.backend, row.precision) == ("eager", "fp32"))
    return OptimizeResult(
        Path(output),
        chosen.backend,
        chosen.precision,
        chosen.report,
        reference_top1=float(eager.top1 or 0.0),
        images=len(bundle.val),  # type: ignore[arg-type]
    )
