"""Top-1 / top-5 evaluation, shared by training and ``repvgg eval``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from repvgg.data import BadImage, collate_reporting_bad
from repvgg.distributed import DistContext, all_reduce_sum


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float
    loss: float
    images: int
    seconds: float

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
    """This process's share of an evaluation set: every sample counted exactly once over all ranks."""
    if not context.distributed:
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
) -> EvalResult:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    start = time.perf_counter()
    for images, labels, bad in loader:
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
    model.train(was_training)
    count = max(float(totals[3]), 1.0)
    return EvalResult(
        top1=100.0 * float(totals[0]) / count,
        top5=100.0 * float(totals[1]) / count,
        loss=float(totals[2]) / count,
        images=int(totals[3]),
        seconds=seconds,
    )
