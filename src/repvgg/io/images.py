"""Reading image files: an unreadable file becomes a :class:`BadImage` that says why, never an exception
from deep inside a data loader."""

from __future__ import annotations

import glob
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from repvgg.exceptions import DataError
from repvgg.io.files import PathLike

MAX_REASON = 200  # characters of a library's message kept in a BadImage's reason


@dataclass(frozen=True)
class BadImage:
    """Returned in place of an image whose file cannot be decoded, so that the caller can report it."""

    path: str
    reason: str

    def error(self, remedy: str) -> DataError:
        return DataError(f"Cannot read image {self.path} ({self.reason}); {remedy}.")


def open_image(path: PathLike, in_chans: int = 3) -> Any:
    """The image in ``path`` as an 8-bit PIL image ("L" if ``in_chans`` is 1 else "RGB"), or a BadImage.

    - EXIF orientation is applied, so a photo saved rotated comes out upright (and its size swapped).
    - 16- and 32-bit integer grey ("I;16*", "I") keep their top 8 bits (0..65535 -> 0..255); values outside
      0..65535 (rare 32-bit data) are clipped. 16-bit colour files already decode to 8-bit RGB(A) in Pillow.
    - Floating-point grey ("F") is taken as 0..1 if its maximum is at most 1, else as 0..255; values outside
      that range are clipped and NaN becomes 0.
    - Transparency (RGBA, LA, PA, palette or grey/RGB with a transparent colour) is composited onto a
      black background: a fully transparent pixel is black.
    - Palette, bilevel, CMYK, YCbCr, LAB, ... go through Pillow's RGB conversion; grey is replicated to RGB
      and RGB becomes grey by Pillow's ITU-R 601 luma.
    - A file with more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused as a possible decompression
      bomb; missing, empty, damaged or foreign files are refused with a one-line reason.
    """
    return _decode(path, str(path), in_chans)


def decode_image(data: bytes, name: str, in_chans: int = 3) -> Any:
    """The image encoded in ``data`` (a file's bytes, e.g. read from a shard) exactly as :func:`open_image`
    gives it for a file holding those bytes, or a BadImage; ``name`` says where the bytes came from."""
    return _decode(io.BytesIO(data), name, in_chans)


def _decode(source: PathLike | io.BytesIO, name: str, in_chans: int) -> Any:
    """What :func:`open_image` and :func:`decode_image` share: ``source`` is a path or a file's bytes."""
    try:
        if not isinstance(source, io.BytesIO) and os.path.isdir(source):
            return BadImage(name, "a directory, not an image file")
        from PIL import Image, ImageOps

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                return _to_8bit(ImageOps.exif_transpose(image), "L" if in_chans == 1 else "RGB")
    except Exception as error:  # PIL raises many types for damaged or foreign files
        return BadImage(name, _reason(source, error))


def _to_8bit(image: Any, mode: str) -> Any:
    """``image`` (any Pillow mode) as an 8-bit ``mode`` ("L" or "RGB") image, as :func:`open_image` says."""
    from PIL import Image

    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        image = Image.fromarray(_grey_to_uint8(np.asarray(image), floating=image.mode == "F"))
    elif "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (0, 0, 0))
        image.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode not in ("1", "L", "RGB"):
        image = image.convert("RGB")  # palette, CMYK, YCbCr, LAB, HSV, ...
    return image.convert(mode)


def _grey_to_uint8(values: np.ndarray, floating: bool) -> np.ndarray:
    """16/32-bit integer grey as its top 8 bits of 16 (clipped to 0..65535 first); float grey from 0..1 if
    its maximum is at most 1, else from 0..255."""
    if not floating:
        return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _reason(source: PathLike | io.BytesIO, error: Exception) -> str:
    """A short one-line reason for a BadImage of ``source`` (a path or a file's bytes)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(error, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        count = f"{pixels.group(1)} pixels" if pixels else "too many pixels"
        limit = Image.MAX_IMAGE_PIXELS
        return f"image too large: {count}, over the limit of {limit} (possible decompression bomb)"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, UnidentifiedImageError):
        if isinstance(source, io.BytesIO):
            empty = source.getbuffer().nbytes == 0
        else:
            empty = os.path.isfile(source) and os.path.getsize(source) == 0
        return "empty file" if empty else "not an image file that Pillow can read"
    message = " ".join(f"{type(error).__name__}: {error}".split())
    return message if len(message) <= MAX_REASON else message[: MAX_REASON - 3] + "..."


#: The suffixes of the image files a folder is searched for (as torchvision's ImageFolder reads them).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_files(sources: Sequence[PathLike]) -> list[Path]:
    """The image files that ``sources`` name: files as given (a missing one is kept, to be reported as
    unreadable), folders searched recursively for :data:`IMAGE_SUFFIXES`, and glob patterns expanded."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise DataError(f"The folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            found += inside
        elif not path.exists() and glob.has_magic(str(source)):
            matches = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"The pattern {source} matches no file.")
            found += matches
        else:
            found.append(path)
    return found
