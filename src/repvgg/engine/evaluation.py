"""Top-1 / top-5 evaluation, shared by training and ``repvgg eval``, and the evaluation of a checkpoint."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from repvgg.core.int8 import QuantizedRepVGG
from repvgg.core.models import RepVGG
from repvgg.core.reparam import refuse_nonfinite
from repvgg.engine.config import AMP_CHOICES
from repvgg.engine.data import build_data, collate_reporting_bad, default_workers
from repvgg.engine.distributed import DistContext, all_reduce_sum, init_distributed
from repvgg.exceptions import DataError, InferenceError, TrainingError
from repvgg.io.checkpoints import load_checkpoint, require_kind
from repvgg.io.files import atomic_write, writable_or_raise
from repvgg.io.images import BadImage
from repvgg.io.jsonfile import write_json
from repvgg.io.onnxfile import OnnxModel
from repvgg.runtime.optimize import optimize, recorded_runtime
from repvgg.runtime.progress import progress_bar

#: Mixed-precision choices of training and evaluation (``autocast`` dtypes).
AMP_DTYPES = dict(zip(AMP_CHOICES, (None, torch.bfloat16, torch.float16), strict=True))


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float
    loss: float
    images: int
    seconds: float
    notes: tuple[str, ...] = ()  # what the user should know about how the figures were made
    #: images per (true class, predicted class); row sums are each class's images
    confusion: tuple[tuple[int, ...], ...] = ()
    class_names: tuple[str, ...] = ()  # of the dataset, where known

    def per_class_top1(self) -> list[float | None]:
        """Top-1 of each class in percent (None for a class with no images)."""
        return [100.0 * row[i] / sum(row) if sum(row) else None for i, row in enumerate(self.confusion)]

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}top1": self.top1,
            f"{prefix}top5": self.top5,
            f"{prefix}loss": self.loss,
            f"{prefix}images_per_s": self.images_per_s,
        }


def shard(dataset: Dataset[Any], context: DistContext) -> Dataset[Any]:
    """This process's share of an evaluation set: every sample counted exactly once over all ranks (shards
    and streams are built for their process already: ``repvgg.engine.data.build_data``)."""
    if not context.distributed or isinstance(dataset, IterableDataset):
        return dataset
    return Subset(dataset, list(range(context.rank, len(dataset), context.world_size)))  # type: ignore[arg-type]


def eval_loader(
    dataset: Dataset[Any], batch_size: int, workers: int, context: DistContext
) -> DataLoader[Any]:
    return DataLoader(
        shard(dataset, context),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_reporting_bad,
        persistent_workers=False,
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    context: DistContext,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    on_bad_images: Callable[[list[BadImage]], None] | None = None,
    progress: bool = False,
) -> EvalResult:
    """Top-1 and top-5 accuracy (percent), mean cross-entropy and the confusion matrix of ``model`` over
    ``loader`` (summed over all processes)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    confusion: torch.Tensor | None = None
    start = time.perf_counter()
    bar = progress_bar(loader, desc="eval", enabled=progress and context.is_main)
    for images, labels, bad in bar:
        if bad and on_bad_images is not None:
            on_bad_images(bad)
        if len(labels) == 0:
            continue
        images = images.to(context.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(context.device)
        with torch.autocast(context.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        classes = logits.shape[1]
        pairs = torch.bincount(labels * classes + logits.argmax(1), minlength=classes * classes)
        confusion = pairs if confusion is None else confusion + pairs
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        totals += torch.tensor(
            [
                float(hits[:, 0].sum()),
                float(hits.any(dim=1).sum()),
                float(F.cross_entropy(logits, labels, reduction="sum")),
                float(len(labels)),
            ],
            dtype=torch.float64,
        )
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(totals, context)
    matrix: tuple[tuple[int, ...], ...] = ()
    if confusion is not None:
        summed = all_reduce_sum(confusion.double(), context).long()  # on the CPU from here
        size = math.isqrt(len(summed))
        matrix = tuple(tuple(int(v) for v in row) for row in summed.reshape(size, size).tolist())
    model.train(was_training)
    count = max(float(totals[3]), 1.0)
    return EvalResult(
        top1=100.0 * float(totals[0]) / count,
        top5=100.0 * float(totals[1]) / count,
        loss=float(totals[2]) / count,
        images=int(totals[3]),
        seconds=seconds,
        confusion=matrix,
    )


def write_results(
    result: EvalResult, path: Path, *, class_names: list[str], about: dict[str, Any]
) -> list[Path]:
    """The figures of an evaluation as ``.json`` (everything: totals, per class, confusion matrix) or ``.csv``
    (one row per class, then ``all``), by ``path``'s suffix; and the confusion matrix as a PNG beside it."""
    check_results_file(path)
    per_class = [
        {"class": name, "images": sum(row), "top1": top1}
        for name, row, top1 in zip(class_names, result.confusion, result.per_class_top1(), strict=True)
    ]
    what = "the evaluation results"
    if path.suffix == ".json":
        record = {**about, **result.as_dict(), "images": result.images, "notes": list(result.notes)}
        confusion = [list(row) for row in result.confusion]
        record.update(class_names=class_names, per_class=per_class, confusion=confusion)
        write_json(path, record, what=what, error_type=DataError)
    else:
        lines = ["class,images,top1"]
        for row in per_class:
            top1 = "" if row["top1"] is None else f"{row['top1']:.4f}"
            lines.append(f"{csv_field(row['class'])},{row['images']},{top1}")
        lines.append(f"all,{result.images},{result.top1:.4f}")
        text = "\n".join(lines) + "\n"
        atomic_write(path, lambda target: target.write_text(text), what=what, error_type=DataError)
    picture = path.with_name(path.stem + "_confusion.png")
    _confusion_png(result, class_names, picture)
    return [path, picture]


def check_results_file(path: Path) -> None:
    if path.suffix not in (".json", ".csv"):
        raise DataError(f"`results_file` must end in .json or .csv, got {path.name}.")


def csv_field(text: str) -> str:
    """One CSV field: quoted where it holds a comma, a quote or a line break."""
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _confusion_png(result: EvalResult, class_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = torch.tensor(result.confusion, dtype=torch.float64)
    rows = matrix / matrix.sum(1, keepdim=True).clamp_min(1)  # each true class's share of predictions
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(class_names)), class_names, fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(
        f"top-1 {result.top1:.2f}% on {result.images} images (rows: share of each true class)", fontsize=9
    )
    figure.tight_layout()
    atomic_write(
        path,
        lambda target: figure.savefig(target, dpi=110, format="png"),
        what="the confusion matrix",
        error_type=DataError,
    )
    plt.close(figure)


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
    image_size: int | None = None,
    results_file: str | Path | None = None,
    progress: bool = False,
) -> EvalResult:
    """Top-1/top-5 of a checkpoint (any format :func:`repvgg.load_checkpoint` reads) on a validation set.

    Images are prepared at the size the checkpoint records (its training size) unless ``image_size`` says
    otherwise, which the result's notes then say. Without ``backend`` the checkpoint is evaluated as stored,
    in eager PyTorch; with one, it is first converted and run by :func:`optimize` (timed on one batch of the
    validation set). Weights that are not finite are refused. ``results_file`` (``.json`` or ``.csv``) gets
    the figures with each class's top-1 (and a PNG of the confusion matrix beside it).
    """
    if results_file is not None:
        check_results_file(Path(results_file))
        writable_or_raise(results_file, DataError)
    if amp not in AMP_DTYPES:
        raise TrainingError(f"`amp` must be one of {', '.join(AMP_DTYPES)}, got {amp!r}.")
    require_kind(checkpoint, ("classifier", "int8", "onnx"), "classification", InferenceError)
    model = load_checkpoint(checkpoint)
    assert isinstance(model, RepVGG | QuantizedRepVGG | OnnxModel)
    refuse_nonfinite(model, str(checkpoint), InferenceError)
    recorded = model.info.preprocessing.image_size if model.info.preprocessing else None
    notes: tuple[str, ...] = ()
    if image_size is not None and recorded is not None and image_size != recorded:
        notes = (f"evaluated at {image_size} px, not at the {recorded} px the checkpoint was trained at",)
    if isinstance(model, QuantizedRepVGG | OnnxModel):
        if (device or "cpu") != "cpu" or amp != "none":
            what = "An INT8 model" if isinstance(model, QuantizedRepVGG) else "An ONNX file"
            raise InferenceError(f"{what} is evaluated on the CPU without `amp`: drop those options.")
        device = "cpu"
    size = image_size or (recorded if data == "imagefolder" else None)  # small sets have one native size
    bundle = build_data(data, data_dir, image_size=size, val_subset=val_subset)
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
    dtype = torch.float32
    recorded_way = recorded_runtime(model) if backend is None else None
    if recorded_way is not None:
        backend, dtype = recorded_way
        way = f"{backend} in {str(dtype).removeprefix('torch.')}"
        notes = (
            *notes,
            f"ran with {way}, the way repvgg optimize recorded in the checkpoint",
        )
    if backend is not None:
        images, _, bad = next(iter(loader))
        if bad:
            refuse(bad)
        runner = optimize(model, backend, example_input=images.to(context.device), dtype=dtype)
    result = evaluate(
        runner, loader, context, amp_dtype=AMP_DTYPES[amp], on_bad_images=refuse, progress=progress
    )
    if results_file is not None and context.is_main:
        about = {"checkpoint": str(checkpoint), "data": data, "image_size": bundle.image_size}
        written = write_results(result, Path(results_file), class_names=bundle.class_names, about=about)
        notes = (*notes, f"wrote {' and '.join(str(p) for p in written)}")
    return dataclasses.replace(result, notes=notes, class_names=tuple(bundle.class_names))
