"""open_image: every common kind of file becomes an 8-bit L or RGB image, or a BadImage that says why."""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repvgg.io.images import BadImage, open_image

RAMP = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once


def write_png(path: Path, pixels: np.ndarray, colour_type: int) -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): 2 = RGB, 4 = grey + alpha."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def saved(image: Image.Image, name: str, **options: object) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        image.save(tmp / name, **options)
        return tmp / name

    return build


def palette_image() -> Image.Image:
    """A 2x2 palette image with the colours red, green, blue, white."""
    image = Image.new("P", (2, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])
    image.putdata([0, 1, 2, 3])
    return image


def rotated_jpeg(tmp: Path) -> Path:
    """A 40x20 JPEG, red on the left and blue on the right, that EXIF says to turn 90 degrees clockwise."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    image.save(tmp / "rotated.jpg", exif=exif, quality=95)
    return tmp / "rotated.jpg"


def near(expected: object, tolerance: int = 0) -> Callable[[np.ndarray], None]:
    def check(pixels: np.ndarray) -> None:
        assert np.abs(pixels.astype(int) - np.array(expected)).max() <= tolerance, pixels

    return check


def ramp_check(pixels: np.ndarray) -> None:
    grey = pixels if pixels.ndim == 2 else pixels[..., 0]
    if pixels.ndim == 3:
        assert (pixels == grey[..., None]).all()  # grey replicated
    flat = grey.ravel().astype(int)
    assert (np.diff(flat) >= 0).all() and flat[0] == 0 and flat[-1] == 255
    assert (flat == 255).mean() <= 0.01
    assert (flat == RAMP.ravel() >> 8).all()


def palette_check(pixels: np.ndarray) -> None:
    assert pixels.tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]]


def rotated_check(pixels: np.ndarray) -> None:
    # Turned clockwise: the red left half is now on top, the blue right half at the bottom.
    assert np.abs(pixels[2, 10].astype(int) - (255, 0, 0)).max() <= 10
    assert np.abs(pixels[-3, 10].astype(int) - (0, 0, 255)).max() <= 10


def float_ramp(top: float) -> Image.Image:
    return Image.fromarray(np.linspace(0, top, 256, dtype=np.float32).reshape(16, 16))


def float_check(pixels: np.ndarray) -> None:
    assert pixels.ravel().tolist() == list(range(256))


def rgb_transparent(tmp: Path) -> Path:
    image = Image.new("RGB", (2, 1), (10, 20, 30))
    image.putpixel((1, 0), (200, 100, 50))
    image.save(tmp / "trns.png", transparency=(10, 20, 30))
    return tmp / "trns.png"


def palette_transparent(tmp: Path) -> Path:
    palette_image().save(tmp / "ptrns.png", transparency=0)  # red is transparent
    return tmp / "ptrns.png"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    in_chans: int
    size: tuple[int, int]
    check: Callable[[np.ndarray], None]


I32 = np.array([[-5, 0, 0x1234, 65535, 70000, 1 << 30]], dtype=np.int32)
RGBA = Image.new("RGBA", (3, 1))
RGBA.putdata([(200, 100, 50, 255), (200, 100, 50, 128), (200, 100, 50, 0)])
LITTLE_ENDIAN_RAMP = Image.frombytes("I;16L", (256, 256), RAMP.astype("<u2").tobytes())
BILEVEL = Image.new("1", (2, 2))
BILEVEL.putdata([0, 255, 255, 0])

CASES = [
    Case("I;16 PNG ramp to L", saved(Image.fromarray(RAMP), "g16.png"), 1, (256, 256), ramp_check),
    Case("I;16 PNG ramp to RGB", saved(Image.fromarray(RAMP), "g16.png"), 3, (256, 256), ramp_check),
    Case(
        "I;16B TIFF ramp", saved(Image.fromarray(RAMP.astype(">u2")), "g16b.tif"), 1, (256, 256), ramp_check
    ),
    Case("I;16L TIFF ramp", saved(LITTLE_ENDIAN_RAMP, "g16l.tif"), 1, (256, 256), ramp_check),
    Case(
        "I 32-bit TIFF clipped to 0..65535",
        saved(Image.fromarray(I32), "g32.tif"),
        1,
        (6, 1),
        near([[0, 0, 0x12, 255, 255, 255]]),
    ),
    Case("F TIFF 0..1", saved(float_ramp(1.0), "f1.tif"), 1, (16, 16), float_check),
    Case(
        "F TIFF 0..255", saved(float_ramp(255.0), "f255.tif"), 3, (16, 16), lambda p: float_check(p[..., 1])
    ),
    Case(
        "16-bit RGB PNG keeps the top byte",
        lambda tmp: write_png(tmp / "rgb16.png", np.full((3, 2, 3), (65535, 0x8000, 0x00FF)), 2),
        3,
        (2, 3),
        near((255, 128, 0)),
    ),
    Case(
        "16-bit RGB PNG to luma",
        lambda tmp: write_png(tmp / "rgb16.png", np.full((3, 2, 3), (65535, 0, 0)), 2),
        1,
        (2, 3),
        near(76),  # 0.299 * 255
    ),
    Case(
        "16-bit grey+alpha PNG on black",
        lambda tmp: write_png(tmp / "la16.png", np.full((2, 2, 2), (0xC800, 0x8000)), 4),
        1,
        (2, 2),
        near(100, 1),  # 200 at alpha 128/255
    ),
    Case("palette PNG", saved(palette_image(), "p.png"), 3, (2, 2), palette_check),
    Case("palette GIF", saved(palette_image(), "p.gif"), 3, (2, 2), palette_check),
    Case(
        "palette PNG to luma",
        saved(palette_image(), "p.png"),
        1,
        (2, 2),
        near([[76, 150], [29, 255]]),
    ),
    Case(
        "palette with a transparent index on black",
        palette_transparent,
        3,
        (2, 2),
        near([[(0, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 255)]]),
    ),
    Case(
        "RGBA on black",
        saved(RGBA, "rgba.png"),
        3,
        (3, 1),
        near([[(200, 100, 50), (100, 50, 25), (0, 0, 0)]], 1),
    ),
    Case("RGBA on black to luma", saved(RGBA, "rgba.png"), 1, (3, 1), near([[124, 62, 0]], 1)),
    Case(
        "LA on black",
        saved(Image.new("LA", (4, 2), (200, 128)), "la.png"),
        3,
        (4, 2),
        near((100, 100, 100), 1),
    ),
    Case(
        "RGB with a transparent colour on black",
        rgb_transparent,
        3,
        (2, 1),
        near([[(0, 0, 0), (200, 100, 50)]]),
    ),
    Case(
        "CMYK TIFF", saved(Image.new("CMYK", (3, 2), (255, 0, 0, 0)), "c.tif"), 3, (3, 2), near((0, 255, 255))
    ),
    Case(
        "CMYK JPEG",
        saved(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "c.jpg"),
        3,
        (8, 8),
        near((0, 255, 255), 8),
    ),
    Case(
        "YCbCr TIFF",
        saved(Image.new("YCbCr", (2, 2), (128, 128, 128)), "y.tif"),
        3,
        (2, 2),
        near((128, 128, 128), 1),
    ),
    Case("bilevel to L", saved(BILEVEL, "b.png"), 1, (2, 2), near([[0, 255], [255, 0]])),
    Case(
        "bilevel to RGB",
        saved(BILEVEL, "b.png"),
        3,
        (2, 2),
        near([[(0,) * 3, (255,) * 3], [(255,) * 3, (0,) * 3]]),
    ),
    Case("grey to RGB replicated", saved(Image.new("L", (3, 2), 77), "l.png"), 3, (3, 2), near((77, 77, 77))),
    Case("RGB to luma", saved(Image.new("RGB", (3, 2), (0, 255, 0)), "g.png"), 1, (3, 2), near(150)),
    Case("RGB unchanged", saved(Image.new("RGB", (3, 2), (1, 2, 3)), "rgb.png"), 3, (3, 2), near((1, 2, 3))),
    Case("EXIF-rotated JPEG comes out upright", rotated_jpeg, 3, (20, 40), rotated_check),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_open_image_modes(case: Case, tmp_path: Path) -> None:
    image = open_image(case.build(tmp_path), case.in_chans)
    assert not isinstance(image, BadImage), image
    assert image.mode == ("L" if case.in_chans == 1 else "RGB")
    assert image.size == case.size
    case.check(np.asarray(image))


def truncated_png(tmp: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp / "t.png")
    data = (tmp / "t.png").read_bytes()
    (tmp / "t.png").write_bytes(data[: len(data) // 2])
    return tmp / "t.png"


def text_file(tmp: Path) -> Path:
    (tmp / "notes.png").write_text("not a picture\n" * 10)
    return tmp / "notes.png"


def empty_file(tmp: Path) -> Path:
    (tmp / "empty.png").write_bytes(b"")
    return tmp / "empty.png"


def directory(tmp: Path) -> Path:
    (tmp / "folder.png").mkdir()
    return tmp / "folder.png"


BOMB = saved(Image.new("L", (100, 50)), "bomb.png")  # 5000 pixels

BAD = [
    ("bomb over the limit (warning)", BOMB, 4000, ["too large", "5000 pixels", "4000"]),
    ("bomb over twice the limit (error)", BOMB, 2000, ["too large", "5000 pixels", "2000"]),
    ("truncated PNG", truncated_png, None, ["truncated"]),
    ("text file named .png", text_file, None, ["not an image"]),
    ("empty file", empty_file, None, ["empty"]),
    ("directory", directory, None, ["directory"]),
    ("missing file", lambda tmp: tmp / "missing.png", None, ["no such file"]),
]


@pytest.mark.parametrize(("build", "limit", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_open_image_refuses(
    build: Callable[[Path], Path],
    limit: int | None,
    words: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = build(tmp_path)
    if limit is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters = list(warnings.filters)
    bad = open_image(path, 3)
    assert warnings.filters == filters  # no global change
    assert isinstance(bad, BadImage), bad
    assert bad.path == str(path)
    assert "\n" not in bad.reason and len(bad.reason) <= 200
    for word in words:
        assert word in bad.reason.lower()
    assert str(path) in str(bad.error("fix it"))


def test_long_library_message_is_trimmed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("line one\nline two " + "x" * 500)

    monkeypatch.setattr(Image, "open", fail)
    bad = open_image(tmp_path / "any.png")
    assert isinstance(bad, BadImage)
    assert bad.reason.startswith("OSError: line one line two")
    assert "\n" not in bad.reason and len(bad.reason) <= 200


def test_predict_on_16bit_png_is_not_saturated(tmp_path: Path) -> None:
    from repvgg.runtime.predict import predict
    from tests.helpers import small_model

    picture = np.random.default_rng(0).integers(0, 65536, (28, 28), dtype=np.uint16)
    Image.fromarray(picture).save(tmp_path / "deep.png")
    Image.fromarray((picture >> 8).astype(np.uint8)).save(tmp_path / "shallow.png")
    deep, shallow = open_image(tmp_path / "deep.png", 1), open_image(tmp_path / "shallow.png", 1)
    assert deep.mode == shallow.mode == "L"
    assert np.abs(np.asarray(deep, dtype=int) - np.asarray(shallow, dtype=int)).max() <= 1
    assert (np.asarray(deep) == 255).mean() < 0.02  # it was 99% before

    predictions, bad = predict(small_model(), [tmp_path / "deep.png"], preprocessing="fashion-mnist", topk=3)
    assert not bad and len(predictions) == 1 and len(predictions[0].top) == 3
    assert all(np.isfinite(p) for _, p in predictions[0].top)
