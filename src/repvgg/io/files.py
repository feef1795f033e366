"""Writing files so that a failure never leaves a damaged file where a good one was."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from repvgg.exceptions import CheckpointError, RepVGGError

PathLike = str | os.PathLike[str]


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    *,
    what: str = "the checkpoint",
    error_type: type[RepVGGError] = CheckpointError,
) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place.

    An interrupted or failed write never leaves a damaged file where a good one was; a failure is
    reported as one sentence naming ``what`` was being written.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if temporary.is_file():
            temporary.unlink()
        raise error_type(
            f"Cannot write {what} to {path} ({error.strerror or error}); choose a writable "
            "location with enough free space."
        ) from error


def writable_or_raise(path: PathLike, error_type: type[RepVGGError] = CheckpointError) -> None:
    """Refuse early, before any slow work, an output path that cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise error_type(f"{target} is a folder; give a file name to write to.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as error:
        raise error_type(
            f"Cannot write to {target.parent} ({error.strerror or error}); choose a folder you can write to."
        ) from error
