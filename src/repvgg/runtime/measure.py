"""Counting and timing: parameters, multiply-accumulates, and interleaved throughput measurements."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm weight and bias count; running statistics do not)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass, counted by ``torch.utils.flop_counter``.

    Runs on the model's device with an empty input; on the ``meta`` device it costs no arithmetic.
    """
    reference = next(model.parameters())
    inputs = torch.empty(input_shape, device=reference.device, dtype=reference.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class Throughput:
    """Timings of one model over repeated batches."""

    batch_size: int
    seconds_per_batch: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds_per_batch)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median_s

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median of the batches: how noisy the measurement was."""
        return (max(self.seconds_per_batch) - min(self.seconds_per_batch)) / self.median_s


def _synchronize(inputs: torch.Tensor) -> None:
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)


@torch.no_grad()
def time_interleaved(
    models: Mapping[str, Callable[[torch.Tensor], Any]],
    inputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    warmup: int = 2,
    rounds: int = 10,
    batches_per_round: int = 1,
    on_progress: Callable[[], None] | None = None,
) -> dict[str, Throughput]:
    """The one timer: each model (any callable) on its input, interleaved round by round so that machine
    noise hits all of them alike.

    ``inputs`` is one batch for all models or one per model (networks with other input channels). Every
    model first runs ``warmup`` batches; then each of ``rounds`` rounds times ``batches_per_round`` batches
    of every model in turn. Models should already be in eval mode. On CUDA each call is timed up to its
    completion (the device is synchronized). ``on_progress`` is called after each model's warm-up and turn.
    """
    batch_of = {name: inputs[name] if isinstance(inputs, Mapping) else inputs for name in models}
    for name, model in models.items():
        for _ in range(warmup):
            model(batch_of[name])
        _synchronize(batch_of[name])
        if on_progress is not None:
            on_progress()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for _ in range(batches_per_round):
                start = time.perf_counter()
                model(batch_of[name])
                _synchronize(batch_of[name])
                times[name].append(time.perf_counter() - start)
            if on_progress is not None:
                on_progress()
    return {name: Throughput(batch_of[name].shape[0], t) for name, t in times.items()}
