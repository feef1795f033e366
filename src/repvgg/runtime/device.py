"""The one reading of a ``device`` parameter (``cpu``, ``cuda``, ``cuda:N``, or None: CUDA if available), and
the one description of the machine a figure was measured on: the GPU, or the CPU with the instructions that
decide which kernels are fast (VNNI for int8, bf16 and AMX for bfloat16)."""

from __future__ import annotations

import torch

from repvgg.exceptions import InferenceError, RepVGGError
from repvgg.io.machine import NOTABLE_FLAGS, cpu_features
from repvgg.runtime.names import DEVICE_PATTERN


def resolve_device(name: str | None, error_type: type[RepVGGError] = InferenceError) -> torch.device:
    """The device ``name`` asks for; an unknown name, or CUDA where no GPU is usable, is one sentence."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_PATTERN.fullmatch(name):
        raise error_type(f"`device` must be cpu, cuda or cuda:N, got {name!r}.")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error_type(f"`device` {name} was asked for but no CUDA GPU is usable here; use cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error_type(
                f"`device` {name} does not exist: this machine has {torch.cuda.device_count()} GPUs."
            )
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the threads torch uses, its capability and notable flags
    (``AMD EPYC, 2 threads, AVX512 + avx512_bf16 avx512_vnni``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = cpu_features()
    notable = [flag for flag in cpu["flags"] if flag in NOTABLE_FLAGS]
    extra = f" + {' '.join(notable)}" if notable else ""
    return f"{cpu['model']}, {torch.get_num_threads()} threads, {cpu['capability']}{extra}"
