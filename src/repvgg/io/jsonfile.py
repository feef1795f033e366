"""Results as strict JSON: what any JSON reader accepts (no ``NaN`` or ``Infinity``), written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from repvgg.exceptions import RepVGGError, TrainingError
from repvgg.io.files import atomic_write


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (``null``), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict(item) for item in value]
    return value


def json_text(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(strict(value), indent=indent, allow_nan=False)


def write_json(
    path: Path, value: Any, *, what: str = "the results", error_type: type[RepVGGError] = TrainingError
) -> None:
    """Write ``value`` as indented strict JSON (atomically)."""
    text = json_text(value, indent=2) + "\n"
    atomic_write(path, lambda target: target.write_text(text), what=what, error_type=error_type)
