"""Where and how a run ran: versions, device, CPU capability, command line, source revision. Written into
every run's ``summary.json`` so that a figure can be traced to the machine and code that produced it."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import repvgg
from repvgg.io.machine import cpu_features
from repvgg.runtime.device import device_name


def _git_revision() -> str | None:
    """The commit of the source tree this package runs from, when it is a git checkout (else None)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(repvgg.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()[:12] or None if result.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    return {
        "repvgg": repvgg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_features(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "command": sys.argv,
        "git_revision": _git_revision(),
    }
