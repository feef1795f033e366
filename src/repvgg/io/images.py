"""Reading image files: an unreadable file becomes a :class:`BadImage` that says why, never an exception
from deep inside a data loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repvgg.exceptions import DataError
from repvgg.io.files import PathLike


@dataclass(frozen=True)
class BadImage:
    """Returned in place of an image whose file cannot be decoded, so that the caller can report it."""

    path: str
    reason: str

    def error(self, remedy: str) -> DataError:
        return DataError(f"Cannot read image {self.path} ({self.reason}); {remedy}.")


def open_image(path: PathLike, in_chans: int = 3) -> Any:
    """The image in ``path`` as a PIL image with ``in_chans`` channels (L or RGB), or a :class:`BadImage`."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.convert("L" if in_chans == 1 else "RGB")
    except Exception as error:  # PIL raises many types for damaged or foreign files
        return BadImage(str(path), f"{type(error).__name__}: {error}")
