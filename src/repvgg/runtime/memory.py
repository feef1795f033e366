"""Keeping freed memory for the next batch.

glibc's malloc serves a large block with a fresh ``mmap`` and returns it to the system when it is freed, and
it gives freed heap memory back too once a little sits unused at the top. A network allocates the same large
activations every batch, so every batch page-faults them in again: a fresh 38 MiB tensor costs ~10 ms to
touch where a reused one costs 0.3 ms (BENCHMARKS.md, "Memory the allocator gives back"). Raising both
thresholds keeps blocks of up to 32 MiB (the most glibc allows) in the heap for reuse: eager inference of
RepVGG-A0 at 224 px ran 1.11x faster, training 1.02-1.08x, peak memory the same. It is a process-wide
setting, so the library never makes it by itself: the command line does, and a program that wants the same
calls :func:`retain_freed_memory`.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's mallopt parameters (malloc.h) and the values set: blocks up to 32 MiB come from the heap (glibc's
#: largest mmap threshold), and up to 1 GiB of free heap is kept rather than trimmed.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 32 * 2**20, 2**30


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks of up to 32 MiB for reuse; True where it took (glibc), False
    elsewhere (another C library, where nothing is changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):  # musl and others have no such knobs
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
