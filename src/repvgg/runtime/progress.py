"""Progress on the terminal: one bar factory for every loop of the package.

A bar is drawn only when asked for and standard error is a terminal. Piped into a log file, tqdm's
carriage-return updates become one long unreadable line, so there the loops print a line every so many
steps instead (``log_interval`` of training).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def shows_bars() -> bool:
    """Whether progress bars can be drawn: standard error is a terminal."""
    return sys.stderr.isatty()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "batch",
    enabled: bool = True,
    leave: bool = False,
) -> Any:
    """A tqdm bar on standard error, disabled unless ``enabled`` and :func:`shows_bars`."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not (enabled and shows_bars()),
        leave=leave,
        dynamic_ncols=True,
    )
