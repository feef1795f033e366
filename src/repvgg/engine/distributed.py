"""Process-group set-up for ``torchrun``: PyTorch DDP with gloo on CPU and nccl on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from repvgg.exceptions import TrainingError
from repvgg.runtime.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    ``device`` is ``cpu``, ``cuda`` or None (CUDA when available). Each process uses the GPU of its
    local rank; the backend is nccl on CUDA and gloo on CPU.
    """
    use_cuda = resolve_device(device, TrainingError).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def all_reduce_sum(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum ``values`` over all processes (a no-op for one process)."""
    if context.distributed:
        values = values.to(context.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def average_buffers(model: torch.nn.Module, context: DistContext) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all processes, in place.

    DDP keeps parameters identical, but each process updates its running statistics on its own
    batches; averaging them before evaluation and checkpointing gives every rank the same model.
    """
    if not context.distributed:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            averaged = buffer.detach().to(context.device)
            dist.all_reduce(averaged, op=dist.ReduceOp.SUM)
            buffer.copy_(averaged / context.world_size)


def ranks_agree(model: torch.nn.Module, context: DistContext) -> bool:
    """Whether every process holds bit-identical weights and buffers (trivially true for one process).

    Each rank reduces every tensor to two float64 fingerprints (sum and sum of squares); rank 0
    compares the gathered fingerprints exactly.
    """
    if not context.distributed:
        return True
    fingerprint = (
        torch.stack(
            [torch.stack([t.double().sum(), t.double().square().sum()]) for t in model.state_dict().values()]
        )
        .flatten()
        .to(context.device)
    )
    gathered = [torch.empty_like(fingerprint) for _ in range(context.world_size)]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
