"""``retain_freed_memory``: glibc keeps freed activation-sized blocks in the heap for the next batch instead
of unmapping them (and page-faulting them in again). Checked through glibc's own accounting (``mallinfo2``),
in a fresh process each, since the setting is process-wide."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, ctypes.util, json, sys
import torch
from repvgg.runtime.memory import retain_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
took = retain_freed_memory() if sys.argv[1] == "retain" else None
block = torch.ones(20 * 2**20 // 4)  # 20 MiB, the size of an activation
mapped_while_held = libc.mallinfo2().hblkhd
del block
free_in_heap_after = libc.mallinfo2().fordblks
print(json.dumps({"took": took, "mapped": mapped_while_held, "free_in_heap": free_in_heap_after}))
"""


def _glibc_with_mallinfo2() -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")


def _run(mode: str) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc 2.33+ only (mallopt and mallinfo2)")
def test_a_freed_activation_stays_in_the_heap_for_the_next_batch() -> None:
    default, retained = _run("default"), _run("retain")
    block = 20 * 2**20
    assert default["mapped"] >= block  # by default the block is a fresh mapping, given back on free
    assert retained["took"] is True
    assert retained["mapped"] < block  # retained: it comes from the heap ...
    assert retained["free_in_heap"] >= block  # ... and stays there, free for the next batch


def test_the_command_line_retains_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import repvgg.runtime.memory as memory
    from repvgg.cli import main

    calls: list[bool] = []
    monkeypatch.setattr(memory, "retain_freed_memory", lambda: calls.append(True) or True)
    assert main(["models"]) == 0
    assert calls == [True]
