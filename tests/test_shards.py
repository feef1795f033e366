"""WebDataset shards: written losslessly from an image folder, read back by us and by webdataset, and split so
that every rank and DataLoader worker sees each sample once per epoch, in equal whole batches per rank."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from repvgg.engine.data import collate_reporting_bad, with_transform
from repvgg.engine.shards import ShardedImages
from repvgg.exceptions import ArgumentValueError, DataError
from repvgg.io.images import BadImage, decode_image, open_image
from repvgg.io.shards import image_extensions, iter_samples, read_index, write_shards

CLASSES = ("a cat", "b dog", "c-zebra")
#: (training images per class, shard size): 41 = 5 x 7 + 6 samples and 42 = 8 x 5 + 2, so that neither the
#: samples nor the shards divide evenly by the ranks, workers and batches below by accident.
ODD = ((17, 13, 11), 7)
EVEN = ((15, 14, 13), 5)
VAL = (3, 2, 2)


def make_source(root: Path, train: tuple[int, ...], val: tuple[int, ...] = VAL) -> Path:
    """An ImageNet-layout folder of 8-16 px PNG and JPEG files (some named .JPEG) of random pixels."""
    rng = np.random.default_rng(sum(train))
    val = val[: len(train)]
    for split, counts in (("train", train), ("val", val)):
        for name, count in zip(CLASSES, counts, strict=False):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = rng.integers(0, 256, (8 + number * 3 % 9, 8 + number * 5 % 9, 3), dtype=np.uint8)
                suffix, kind = ((".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"))[number % 3]
                Image.fromarray(pixels).save(folder / f"image{number:02d}{suffix}", format=kind)
    return root


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple[tuple[int, ...], int]], Path]:
    """The shards (their output folder) of a source folder with these counts, written once per module."""
    cache: dict[Any, Path] = {}

    def get(case: tuple[tuple[int, ...], int]) -> Path:
        if case not in cache:
            root = tmp_path_factory.mktemp("shards")
            write_shards(make_source(root / "source", case[0]), root / "out", shard_size=case[1], seed=1)
            cache[case] = root
        return cache[case] / "out"

    return get


def members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def all_samples(folder: Path) -> list[tuple[str, str, bytes, int]]:
    return [sample for shard, _ in read_index(folder).shards for sample in iter_samples(shard)]


def test_shards_hold_the_original_files_in_webdataset_layout(tmp_path: Path) -> None:
    source = make_source(tmp_path / "source", ODD[0])
    steps: list[tuple[int, int]] = []
    summary = write_shards(source, tmp_path / "out", shard_size=7, seed=1, on_step=lambda *s: steps.append(s))
    train = tmp_path / "out" / "train"
    sizes = {p.name: p.stat().st_size for p in train.glob("*.tar")}
    assert summary["train"] == {"samples": 41, "shards": 6, "bytes": sum(sizes.values())}
    assert summary["val"]["samples"] == 7 and summary["val"]["shards"] == 1
    index = json.loads((train / "index.json").read_text())
    assert {k: index[k] for k in ("format", "version", "split", "classes", "samples")} == {
        "format": "repvgg-shards",
        "version": 1,
        "split": "train",
        "classes": list(CLASSES),
        "samples": 41,
    }
    assert [s["samples"] for s in index["shards"]] == [7, 7, 7, 7, 7, 6]
    assert sorted(p.name for p in train.iterdir()) == sorted([*sizes, "index.json"])  # no temporary left
    assert steps[-1] == (48, 48) and steps == sorted(steps)

    files = ImageFolder(str(source / "train")).samples
    keys, exts = [], set()
    for entry in index["shards"]:
        found = members(train / entry["name"])
        names = [name for name, _ in found]
        assert [n.split(".")[0] for n in names[::2]] == [n.split(".")[0] for n in names[1::2]]  # key-grouped
        for (image_name, data), (_, label) in zip(found[::2], found[1::2], strict=True):
            key, ext = image_name.split(".")
            path, expected = files[int(key)]
            assert ext == Path(path).suffix.lower()[1:] and data == Path(path).read_bytes()
            assert int(label) == expected
            keys.append(key)
            exts.add(ext)
        assert len({files[int(n.split(".")[0])][1] for n in names}) > 1  # shuffled: many classes a shard
    assert sorted(keys) == [f"{i:09d}" for i in range(41)] and keys != sorted(keys)
    assert exts == {"png", "jpg", "jpeg"}  # suffixes lowercased (.JPEG files are there)
    val_keys = [key for key, *_ in all_samples(tmp_path / "out" / "val")]
    assert val_keys == sorted(val_keys)  # validation in sorted order

    write_shards(source, tmp_path / "again", shard_size=7, seed=1)
    write_shards(source, tmp_path / "other", shard_size=7, seed=2)
    first = "train/shard-000000.tar"
    assert (tmp_path / "again" / first).read_bytes() == (train.parent / first).read_bytes()  # reproducible
    assert (tmp_path / "other" / first).read_bytes() != (train.parent / first).read_bytes()


def test_overwrite_replaces_the_shards_and_removes_stale_ones(written: Any, tmp_path: Path) -> None:
    output = shutil.copytree(written(EVEN), tmp_path / "out")
    source = make_source(tmp_path / "source", (4, 3))
    write_shards(source, output, shard_size=2, overwrite=True)
    assert sorted(p.name for p in (output / "train").glob("*.tar")) == [
        f"shard-{i:06d}.tar" for i in range(4)
    ]
    assert read_index(output / "train").samples == 7 and len(all_samples(output / "train")) == 7


def keys_seen(folder: Path, rank: int, world: int, epoch: int, workers: int) -> list[str]:
    dataset = ShardedImages(
        folder, np.asarray, rank=rank, world_size=world, seed=5, shuffle_buffer=4, keys=True
    )
    dataset.set_epoch(epoch)
    seen = [key for key, _ in DataLoader(dataset, batch_size=None, num_workers=workers)]
    assert len(seen) == len(dataset)
    return seen


@pytest.mark.parametrize("case", [EVEN, ODD], ids=["42-samples", "41-samples"])
def test_two_ranks_of_two_workers_see_every_sample_once_per_epoch(written: Any, case: Any) -> None:
    folder = written(case) / "train"
    everything = {key for key, *_ in all_samples(folder)}
    total = len(everything)
    epochs = []
    for epoch in (0, 1):
        ranks = [keys_seen(folder, rank, 2, epoch, workers=2) for rank in (0, 1)]
        seen = ranks[0] + ranks[1]
        assert len(ranks[0]) == len(ranks[1]) == total // 2  # the same steps on every rank
        assert len(set(seen)) == len(seen) and set(seen) <= everything  # none twice
        assert len(everything - set(seen)) == total % 2  # only the remainder is left out
        assert set(ranks[0]) == set(keys_seen(folder, 0, 2, epoch, workers=0))  # workers change no share
        epochs.append(ranks)
    assert epochs[0][0] != epochs[1][0]  # another epoch, another order
    assert keys_seen(folder, 0, 2, 0, workers=2) == epochs[0][0]  # a resumed run replays its epoch
    if total % 2:
        left_out = {
            frozenset(everything - set(keys_seen(folder, 0, 2, e, 0) + keys_seen(folder, 1, 2, e, 0)))
            for e in range(4)
        }
        assert len(left_out) > 1  # what is left out changes with the epoch


@pytest.mark.parametrize(
    ("split", "world", "shares"), [("train", 3, [14, 14, 13]), ("val", 8, [1] * 7 + [0])]
)
def test_evaluation_reads_every_sample_once_over_the_ranks(
    written: Any, split: str, world: int, shares: list[int]
) -> None:
    folder = written(ODD) / split
    seen = []
    for rank in range(world):
        dataset = ShardedImages(folder, np.asarray, rank=rank, world_size=world, whole=True, keys=True)
        keys = [key for key, _ in DataLoader(dataset, batch_size=None, num_workers=2 if rank < 2 else 0)]
        assert len(keys) == len(dataset) == shares[rank]
        seen += keys
    assert sorted(seen) == sorted(key for key, *_ in all_samples(folder))  # each exactly once


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this CPU's cores
@pytest.mark.parametrize(
    ("case", "world", "workers", "batch"),
    [
        (ODD, 2, 2, 4),  # 20 a rank: 5 batches, 3 + 2
        (ODD, 3, 2, 5),  # 13 a rank: 2 batches, 1 + 1
        (ODD, 3, 4, 6),  # 13 a rank: 2 batches, two workers idle
        (EVEN, 2, 3, 4),  # 21 a rank: 5 batches, 2 + 2 + 1
        (EVEN, 1, 2, 8),  # 42: 5 batches, 3 + 2
        (EVEN, 4, 2, 3),  # 10 a rank: 3 batches, 2 + 1
    ],
)
def test_loader_length_is_the_batches_yielded(
    written: Any, case: Any, world: int, workers: int, batch: int
) -> None:
    folder = written(case) / "train"
    total = read_index(folder).samples
    seen: list[str] = []
    for rank in range(world):
        dataset = ShardedImages(folder, np.asarray, rank=rank, world_size=world, batch_size=batch, keys=True)
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers)
        batches = list(loader)
        assert len(loader) == len(batches) == total // world // batch
        assert all(len(keys) == batch for keys, _ in batches)  # every batch full
        seen += [key for keys, _ in batches for key in keys]
    assert len(set(seen)) == len(seen)


def test_decoded_images_and_labels_equal_the_originals(written: Any) -> None:
    folder = written(ODD) / "train"
    files = ImageFolder(str(folder.parent.parent / "source" / "train"))
    keys = ShardedImages(folder, np.asarray, seed=3, keys=True)
    images = ShardedImages(folder, np.asarray, seed=3)
    assert images.classes == files.classes == list(CLASSES)
    count = 0
    for (key, label), (pixels, same_label) in zip(keys, images, strict=True):
        path, expected = files.samples[int(key)]
        assert label == same_label == expected
        assert np.array_equal(pixels, np.asarray(open_image(path)))  # lossless: PNG and JPEG alike
        count += 1
    assert count == 41

    resize = v2.Compose([v2.ToImage(), v2.Resize((16, 16)), v2.ToDtype(torch.float32, scale=True)])
    loader = DataLoader(
        with_transform(ShardedImages(folder, np.asarray, batch_size=4), resize),
        batch_size=4,
        num_workers=2,
        collate_fn=collate_reporting_bad,
    )
    batches = list(loader)
    assert len(batches) == 10 and batches[0][0].shape == (4, 3, 16, 16) and not any(b[2] for b in batches)


def test_webdataset_reads_the_same_keys_labels_and_bytes(written: Any) -> None:
    import webdataset

    for split in ("train", "val"):
        folder = written(ODD) / split
        urls = [str(shard) for shard, _ in read_index(folder).shards]
        theirs = [
            (sample["__key__"], ext, sample[ext], int(sample["cls"]))
            for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)
            for ext in sample
            if ext in image_extensions()
        ]
        assert theirs == all_samples(folder) and len(theirs) == read_index(folder).samples


def test_an_undecodable_image_becomes_a_bad_image(tmp_path: Path) -> None:
    source = make_source(tmp_path / "source", (5, 4))
    (source / "train" / "a cat" / "empty.png").write_bytes(b"")
    (source / "train" / "b dog" / "junk.jpg").write_bytes(b"not a jpeg at all")
    write_shards(source, tmp_path / "out", shard_size=3)
    items = list(ShardedImages(tmp_path / "out" / "train", np.asarray))
    bad = sorted((item for item in items if isinstance(item, BadImage)), key=lambda b: b.reason)
    assert [b.reason for b in bad] == ["empty file", "not an image file that Pillow can read"]
    assert all(".tar:0000000" in b.path for b in bad)  # names the shard and the sample
    assert len(items) == 11
    loader = DataLoader(ShardedImages(tmp_path / "out" / "train", np.array), batch_size=None)
    assert sum(isinstance(item, BadImage) for item in loader) == 2
    assert decode_image(b"", "x.png") == BadImage("x.png", "empty file")
    junk = source / "train" / "b dog" / "junk.jpg"
    assert decode_image(junk.read_bytes(), str(junk)) == open_image(junk)  # one mechanism for both


def refuse_write(tmp_path: Path, change: Callable[[Path], None], **options: Any) -> None:
    """Write the shards of a small source folder after ``change`` to it."""
    source = make_source(tmp_path / "source", (3, 2))
    change(source)
    write_shards(source, options.pop("output", tmp_path / "out"), **options)


def damage(path: str, change: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """Copy the shards, change the file at ``path`` in them, then read them."""

    def run(tmp_path: Path, shards: Path) -> None:
        copy = shutil.copytree(shards, tmp_path / "copy")
        change(copy / path)
        list(ShardedImages(copy / "train", np.asarray, shuffle=False, keys=True))

    return run


def truncate(at: int) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(path.read_bytes()[:at])


def keep_members(count: int) -> Callable[[Path], None]:
    return lambda path: tar_of(*members(path)[:count])(path)


def edit_index(**changes: Any) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return change


def tar_of(*files: tuple[str, bytes]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        with tarfile.open(path, "w") as tar:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    return change


def remove_split(split: str) -> Callable[[Path], None]:
    return lambda source: shutil.rmtree(source / split)


REFUSALS: list[tuple[str, Callable[[Path, Path], Any], tuple[str, ...]]] = [
    (
        "output-holds-shards",
        lambda tmp, shards: refuse_write(tmp, lambda s: None, output=shutil.copytree(shards, tmp / "copy")),
        ("already holds shards", "overwrite"),
    ),
    (
        "no-train",
        lambda tmp, shards: refuse_write(tmp, remove_split("train")),
        ("has no train/ folder",),
    ),
    ("no-val", lambda tmp, shards: refuse_write(tmp, remove_split("val")), ("has no val/ folder",)),
    (
        "one-class",
        lambda tmp, shards: refuse_write(tmp, lambda s: [shutil.rmtree(p) for p in s.glob("*/b dog")]),
        ("at least two classes",),
    ),
    (
        "classes-differ",
        lambda tmp, shards: refuse_write(tmp, lambda s: (s / "val" / "b dog").rename(s / "val" / "dog")),
        ("different class folders",),
    ),
    (
        "empty-class",
        lambda tmp, shards: refuse_write(
            tmp, lambda s: [p.unlink() for p in (s / "val" / "b dog").iterdir()]
        ),
        ("No images found under",),
    ),
    (
        "shard-size-0",
        lambda tmp, shards: refuse_write(tmp, lambda s: None, shard_size=0),
        ("`shard_size` must be", "at least 1"),
    ),
    (
        "truncated-shard",
        damage("train/shard-000002.tar", truncate(512 + 100)),
        ("Cannot read the shard", "shard-000002.tar", "repvgg shard"),
    ),
    (
        "not-a-tar",
        damage("train/shard-000001.tar", lambda p: p.write_bytes(b"\x01" * 5000)),
        ("Cannot read the shard", "shard-000001.tar"),
    ),
    (
        "shard-ends-early",
        damage("train/shard-000003.tar", keep_members(6)),
        ("shard-000003.tar ends after 3 samples", "repvgg shard"),
    ),
    (
        "sample-without-cls",
        damage("train/shard-000000.tar", tar_of(("000000007.png", b"x"))),
        ("Sample 000000007", "has no 000000007.cls"),
    ),
    (
        "sample-without-image",
        damage("train/shard-000000.tar", tar_of(("000000007.cls", b"1"))),
        ("Sample 000000007", "exactly one image"),
    ),
    (
        "missing-shard",
        damage("train/shard-000004.tar", Path.unlink),
        ("missing, e.g. shard-000004.tar", "repvgg shard"),
    ),
    ("missing-index", damage("train/index.json", Path.unlink), ("holds no shard index", "repvgg shard")),
    (
        "counts-wrong",
        damage("train/index.json", edit_index(samples=40)),
        ("shards of 41 samples in all but says 40", "repvgg shard"),
    ),
    (
        "wrong-format",
        damage("train/index.json", edit_index(format="other")),
        ("not a version-1 repvgg-shards index",),
    ),
    (
        "fewer-than-a-batch",
        lambda tmp, shards: ShardedImages(shards / "train", np.asarray, world_size=2, batch_size=21),
        ("fewer than one batch of 21 for each of 2",),
    ),
]


@pytest.mark.parametrize(
    ("run", "fragments"),
    [(run, fragments) for _, run, fragments in REFUSALS],
    ids=[name for name, *_ in REFUSALS],
)
def test_refusals_say_what_is_wrong(
    written: Any, tmp_path: Path, run: Any, fragments: tuple[str, ...]
) -> None:
    with pytest.raises(DataError) as caught:
        run(tmp_path, written(ODD))
    message = str(caught.value)
    assert all(fragment in message for fragment in fragments), message
    assert message.count("\n") == 0 and message.endswith(".")


def test_impossible_arguments_are_refused(written: Any) -> None:
    with pytest.raises(ArgumentValueError, match="rank 2 of 2"):
        ShardedImages(written(ODD) / "train", np.asarray, rank=2, world_size=2)
    with pytest.raises(ArgumentValueError, match="leave `batch_size` out"):
        ShardedImages(written(ODD) / "val", np.asarray, batch_size=4, whole=True)
