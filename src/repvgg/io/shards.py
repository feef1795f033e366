"""Training data as WebDataset tar shards: an ImageNet-layout folder written as a few large files, which read
fast from any disk or object store and split exactly over many processes.

Each sample is two tar members in a row: ``<key>.<ext>`` holding the image file's original bytes (not
re-encoded: lossless and fast; ``ext`` is the file's suffix, lowercased) and ``<key>.cls`` holding the class
index as ASCII digits, so that webdataset and timm read the shards too. A key is the sample's index in the
split's sorted (``ImageFolder``) order, zero-padded. Each split folder holds ``shard-000000.tar``, ... and an
``index.json`` listing the class names and every shard with its number of samples.
"""

from __future__ import annotations

import functools
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repvgg.exceptions import DataError
from repvgg.io.files import PathLike, atomic_write

FORMAT = "repvgg-shards"
VERSION = 1
SPLITS = ("train", "val")
INDEX = "index.json"
SHARD_PATTERN = "shard-*.tar"
LABEL_EXT = "cls"
REWRITE = "write shards with `repvgg shard`"


@dataclass(frozen=True)
class ShardIndex:
    """One split's shards, as its ``index.json`` lists them (checked against the files there)."""

    folder: Path
    classes: tuple[str, ...]
    samples: int
    shards: tuple[tuple[Path, int], ...]  # (shard file, its number of samples), in the written order


@functools.cache
def image_extensions() -> frozenset[str]:
    """The suffixes (lowercased, no dot) of the images a shard can hold: torchvision's ImageFolder's."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return frozenset(suffix.lstrip(".") for suffix in IMG_EXTENSIONS)


def write_shards(
    source: PathLike,
    output: PathLike,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Write the ImageNet-layout folder ``source`` (``train/<class>/<images>``, ``val/<class>/<images>``)
    as shards in ``output/train`` and ``output/val``; return each split's samples, shards and bytes.

    The training samples go in an order shuffled by ``seed`` (so that every shard holds many classes), the
    validation samples in sorted order. Every shard holds ``shard_size`` samples but the last. Images are not
    decoded: a damaged or empty file is written as it is and reported as a bad image when read. Every file is
    written atomically; shards an earlier writing left beyond the new ones are removed. ``on_step(done,
    total)`` is told the samples written so far, after each shard.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"`shard_size` must be a whole number of samples, at least 1, got {shard_size!r}.")
    splits = _source_splits(Path(source))
    destination = Path(output)
    _refuse_existing(destination, overwrite)
    total = sum(len(samples) for _, samples in splits.values())
    summary, before = {}, 0
    for split, (classes, samples) in splits.items():
        if split == "train":
            random.Random(seed).shuffle(samples)

        def step(done: int, before: int = before) -> None:
            if on_step is not None:
                on_step(before + done, total)

        summary[split] = _write_split(destination / split, split, classes, samples, shard_size, step)
        before += len(samples)
    return summary


#: One sample to write: its key, its image file and its class index.
Sample = tuple[str, Path, int]


def _source_splits(source: Path) -> dict[str, tuple[list[str], list[Sample]]]:
    """Each split's class names and samples in sorted order, found and checked as ImageFolder finds and
    checks them, plus what a classifier needs (the same classes in both splits, at least two)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    for split in SPLITS:
        if not (source / split).is_dir():
            raise DataError(
                f"{source} has no {split}/ folder: give a folder holding {split}/<class name>/<images>."
            )
    splits = {}
    for split in SPLITS:
        root = source / split
        try:
            classes, class_to_idx = find_classes(str(root))
            found = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
        except OSError as error:  # FileNotFoundError: no class folder, or a class folder without images
            raise DataError(
                f"No images found under {root}: expected {root}/<class name>/<image files> ({error})."
            ) from error
        width = max(9, len(str(len(found) - 1)))
        samples = [(f"{number:0{width}d}", Path(path), label) for number, (path, label) in enumerate(found)]
        splits[split] = (classes, samples)
    classes = splits["train"][0]
    if classes != splits["val"][0]:
        raise DataError(
            f"train/ and val/ in {source} have different class folders; both need the same class names."
        )
    if len(classes) < 2:
        raise DataError(
            f"{source}/train has {len(classes)} class folder ({', '.join(classes)}): a classifier needs at "
            "least two classes (one folder per class)."
        )
    return splits


def _refuse_existing(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise DataError(f"The output {output} is a file; give a folder to write the shards to.")
    held = [output / split for split in SPLITS if _holds_shards(output / split)]
    if held and not overwrite:
        raise DataError(
            f"{held[0]} already holds shards; choose another output folder, or replace them (`overwrite`)."
        )


def _holds_shards(folder: Path) -> bool:
    return (folder / INDEX).exists() or any(folder.glob(SHARD_PATTERN))


def _write_split(
    folder: Path,
    split: str,
    classes: list[str],
    samples: list[Sample],
    shard_size: int,
    step: Callable[[int], None],
) -> dict[str, int]:
    """Write one split's shards, then its index, then remove the shards an earlier writing left there."""
    listed: list[dict[str, Any]] = []
    for start in range(0, len(samples), shard_size):
        chunk = samples[start : start + shard_size]
        name = f"shard-{len(listed):06d}.tar"
        write = functools.partial(_write_tar, samples=chunk)
        atomic_write(folder / name, write, what="a shard", error_type=DataError)
        listed.append({"name": name, "samples": len(chunk)})
        step(start + len(chunk))
    index = {
        "format": FORMAT,
        "version": VERSION,
        "split": split,
        "classes": classes,
        "samples": len(samples),
        "shards": listed,
    }
    text = json.dumps(index, indent=2) + "\n"
    atomic_write(
        folder / INDEX, lambda target: target.write_text(text), what="a shard index", error_type=DataError
    )
    names = {entry["name"] for entry in listed}
    for stale in folder.glob(SHARD_PATTERN):
        if stale.name not in names:
            stale.unlink()
    size = sum((folder / name).stat().st_size for name in names)
    return {"samples": len(samples), "shards": len(listed), "bytes": size}


def _write_tar(target: Path, samples: list[Sample]) -> None:
    """One shard: for each sample its image file's bytes as ``<key>.<ext>``, then ``<key>.cls``."""
    with tarfile.open(target, "w") as tar:
        for key, path, label in samples:
            try:
                data, mtime = path.read_bytes(), int(path.stat().st_mtime)
            except OSError as error:
                raise DataError(
                    f"Cannot read {path} ({error.strerror or error}); make it readable or remove it."
                ) from error
            ext = path.suffix.lower().lstrip(".")
            _add(tar, f"{key}.{ext}", data, mtime)
            _add(tar, f"{key}.{LABEL_EXT}", str(label).encode("ascii"), mtime)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def read_index(folder: PathLike) -> ShardIndex:
    """The index of the split folder ``folder`` (e.g. ``output/train``), checked: its format, that its counts
    add up and that every shard it lists is there."""
    folder = Path(folder)
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{folder} holds no shard index ({INDEX}); {REWRITE} and give its train/ or val/ folder."
        ) from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a readable shard index ({error}); {REWRITE} again.") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{path} is not a version-{VERSION} {FORMAT} index; {REWRITE} again.")
    try:
        classes = tuple(str(name) for name in index["classes"])
        samples = int(index["samples"])
        shards = tuple(
            (folder / _plain_name(entry["name"]), int(entry["samples"])) for entry in index["shards"]
        )
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path} is damaged ({type(error).__name__}: {error}); {REWRITE} again.") from error
    counted = sum(count for _, count in shards)
    if counted != samples or any(count < 1 for _, count in shards):
        raise DataError(
            f"{path} lists shards of {counted} samples in all but says {samples}; {REWRITE} again."
        )
    missing = [shard for shard, _ in shards if not shard.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} shard(s) listed in {path} are missing, e.g. {missing[0].name}; copy them back, "
            f"or {REWRITE} again."
        )
    return ShardIndex(folder, classes, samples, shards)


def _plain_name(name: Any) -> str:
    """A shard's file name, refused when it would lead out of the index's folder."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a file name")
    return name


def iter_samples(
    path: PathLike, skip: int = 0, count: int | None = None
) -> Iterator[tuple[str, str, bytes, int]]:
    """The samples of the shard ``path`` as ``(key, ext, image bytes, label)``, read in one pass front to
    back (streaming: a shard on a network disk or a pipe is read once): the first ``skip`` are passed over
    unread and at most ``count`` are given. Members are grouped into samples by key as webdataset groups
    them. A damaged tar, a sample without its image or its ``.cls``, and a shard that ends before
    ``skip + count`` samples are refused, naming the shard."""
    wanted = None if count is None else skip + count
    seen, key, files = 0, None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                name = _split_name(member.name) if member.isfile() else None
                if name is None:
                    continue  # a folder, or a file that belongs to no sample (webdataset skips those too)
                if name[0] != key:
                    if key is not None and seen > skip:
                        yield _sample(path, key, files)
                    if seen == wanted:
                        return
                    (key, files), seen = (name[0], {}), seen + 1
                if seen > skip:
                    files[name[1]] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as error:
        raise DataError(
            f"Cannot read the shard {path} ({type(error).__name__}: {error}): it is damaged or gone; "
            f"{REWRITE} again."
        ) from error
    if key is not None and seen > skip:
        yield _sample(path, key, files)
    if wanted is not None and seen < wanted:
        raise DataError(
            f"The shard {path} ends after {seen} samples, but its index says it holds at least {wanted}; "
            f"{REWRITE} again."
        )


def _split_name(name: str) -> tuple[str, str] | None:
    """A member's (key, ext): the name up to the first dot of its last part and the rest, lowercased, as
    webdataset splits them; None for a name without a dot there."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _sample(path: PathLike, key: str, files: dict[str, bytes]) -> tuple[str, str, bytes, int]:
    images = sorted(ext for ext in files if ext in image_extensions())
    where = f"Sample {key} in the shard {path}"
    if LABEL_EXT not in files:
        raise DataError(f"{where} has no {key}.{LABEL_EXT} (its class index); {REWRITE} again.")
    if len(images) != 1:
        found = ", ".join(sorted(files))
        raise DataError(f"{where} needs exactly one image file, but holds {found}; {REWRITE} again.")
    text = files[LABEL_EXT].decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise DataError(f"{where} has the class {text!r}, not a class index; {REWRITE} again.")
    return key, images[0], files[images[0]], int(text)
