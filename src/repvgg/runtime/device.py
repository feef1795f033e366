"""The one reading of a ``device`` parameter (``cpu``, ``cuda``, ``cuda:N``, or None: CUDA if available), and
the one description of the machine a figure was measured on: the GPU, or the CPU with the instructions that
decide which kernels are fast (VNNI for int8, bf16 and AMX for bfloat16)."""

from __future__ import annotations

import functools
import platform
from typing import Any

import torch

from repvgg.exceptions import InferenceError, RepVGGError
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


#: Instruction-set flags (Linux ``/proc/cpuinfo`` names) that decide which CPU kernels are fast.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
#: Those beyond what torch's capability level (AVX2, AVX512) already says, shown in every device name.
NOTABLE_FLAGS = ("avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


@functools.cache
def cpu_features() -> dict[str, Any]:
    """The CPU's model, torch's kernel level (``torch.backends.cpu.get_cpu_capability()``) and which of
    :data:`ISA_FLAGS` it has, with what they imply: fast bfloat16 (avx512_bf16 or AMX) and fast int8 (VNNI or
    AMX). Machines differ between sessions, so every benchmark record carries this."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    found = [flag for flag in ISA_FLAGS if flag in flags]
    return {
        "model": model or platform.processor() or platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": found,
        "fast_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "fast_int8": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags),
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the threads torch uses, its capability and notable flags
    (``AMD EPYC, 2 threads, AVX512 + avx512_bf16 avx512_vnni``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = cpu_features()
    notable = [flag for flag in cpu["flags"] if flag in NOTABLE_FLAGS]
    extra = f" + {' '.join(notable)}" if notable else ""
    return f"{cpu['model']}, {torch.get_num_threads()} threads, {cpu['capability']}{extra}"
