"""Running trained checkpoints: evaluation on a dataset (prediction and export come later)."""

from __future__ import annotations

from pathlib import Path

from repvgg.checkpoints import load_checkpoint
from repvgg.data import BadImage, build_data, default_workers
from repvgg.distributed import init_distributed
from repvgg.evaluation import EvalResult, eval_loader, evaluate
from repvgg.exceptions import DataError, TrainingError
from repvgg.models import RepVGG
from repvgg.training import AMP_DTYPES


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
) -> EvalResult:
    """Top-1/top-5 of a checkpoint (any format :func:`repvgg.load_checkpoint` reads) on a validation set."""
    if amp not in AMP_DTYPES:
        raise TrainingError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}.")
    model = load_checkpoint(checkpoint)
    assert isinstance(model, RepVGG)
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

    return evaluate(model, loader, context, amp_dtype=AMP_DTYPES[amp], on_bad_images=refuse)
