"""The CPU a figure was measured on and an INT8 model runs on: its model, torch's kernel level and the
instructions that decide which kernels are fast (VNNI for int8, bf16 and AMX for bfloat16)."""

from __future__ import annotations

import functools
import platform
from typing import Any

import torch

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


def int8_activation_bits() -> int:
    """The activation bits INT8 models are made with here: all 8 on CPUs with VNNI (no overflow there;
    measured to keep QARepVGG-A0 0.3-0.6 points closer to float32), else PyTorch's safe 7 (see
    :data:`repvgg.core.int8.ACTIVATION_BITS`)."""
    return 8 if cpu_features()["fast_int8"] else 7
