"""Progress on the terminal: one bar factory for every loop of the package.

A bar is drawn only when asked for and standard error is a terminal. Piped into a log file, tqdm's
carriage-return updates become one long unreadable line, so there the loops print a line every so many
steps instead (``log_interval`` of training).
"""

from __future__ import annotations

import sys
import time
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


class StepProgress:
    """The named steps of a long job as they begin (``repvgg optimize``'s candidates, built, judged, timed):
    a bar counting them, with the current step's name, on a terminal; else one line per step on standard
    error (``optimize: judging inductor/bf16 (12 s)``); nothing when not ``enabled``. Call it with each step.
    """

    def __init__(self, prefix: str, *, enabled: bool = True) -> None:
        self.prefix, self.enabled, self.started = prefix, enabled, time.perf_counter()
        self.bar = (
            progress_bar(desc=prefix, unit="step", enabled=enabled) if enabled and shows_bars() else None
        )

    def __call__(self, step: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"{self.prefix}: {step}")
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.started
        print(f"{self.prefix}: {step} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
