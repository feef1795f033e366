"""Datasets: the built-in Fashion-MNIST, CIFAR-10's python batches, image folders, and clear errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from repvgg.engine.data import (
    FASHION_MNIST_DIR,
    BadImage,
    build_data,
    collate_reporting_bad,
    strides_for_image_size,
)
from repvgg.exceptions import DataError


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, train: int = 64, test: int = 32) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (count,)))
    return root


def test_fashion_mnist_from_a_folder(tmp_path: Path) -> None:
    bundle = build_data("fashion-mnist", fake_fashion_mnist(tmp_path / "fm"))
    assert (len(bundle.train), len(bundle.val)) == (64, 32)  # type: ignore[arg-type]
    assert bundle.num_classes == 10 and bundle.in_chans == 1 and bundle.image_size == 28
    image, label = bundle.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= label < 10


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_the_installed_fashion_mnist_has_its_statistics() -> None:
    bundle = build_data("fashion-mnist", val_subset=2000)
    assert (len(bundle.train), len(bundle.val)) == (60000, 2000)  # type: ignore[arg-type]
    images = torch.stack([bundle.val[i][0] for i in range(2000)])
    assert abs(float(images.mean())) < 0.05 and abs(float(images.std()) - 1) < 0.05  # normalised


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_data("fashion-mnist", tmp_path)


def test_damaged_idx_file_is_named(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is not a readable IDX file"):
        build_data("fashion-mnist", root)


def fake_cifar10(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def test_cifar10_python_batches(tmp_path: Path) -> None:
    fake_cifar10(tmp_path / "cifar-10-batches-py")
    bundle = build_data("cifar10", tmp_path)
    assert (len(bundle.train), len(bundle.val)) == (100, 20)  # type: ignore[arg-type]
    assert bundle.class_names[3] == "class3" and bundle.in_chans == 3 and bundle.image_size == 32
    assert bundle.train[0][0].shape == (3, 32, 32)


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo owned",))


def test_cifar10_batches_never_unpickle_code(tmp_path: Path) -> None:
    root = fake_cifar10(tmp_path / "c")
    (root / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        build_data("cifar10", root)


def test_cifar10_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs `data_dir`"):
        build_data("cifar10")
    with pytest.raises(DataError, match="No CIFAR-10 python batches"):
        build_data("cifar10", tmp_path)


def make_image_folder(root: Path, per_class: int = 4, bad: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    if bad:
        (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_image_folder_uses_the_papers_transforms(tmp_path: Path) -> None:
    bundle = build_data("imagefolder", make_image_folder(tmp_path), image_size=64)
    assert bundle.class_names == ["cat", "dog"] and bundle.num_classes == 2 and not bundle.in_memory
    image, label = bundle.val[0]
    assert image.shape == (3, 64, 64) and label == 0
    assert bundle.train[5][0].shape == (3, 64, 64)


def test_unreadable_image_is_reported_not_raised_in_the_worker(tmp_path: Path) -> None:
    bundle = build_data("imagefolder", make_image_folder(tmp_path, bad=True), image_size=32)
    samples = [bundle.train[i] for i in range(len(bundle.train))]  # type: ignore[arg-type]
    bad = [s for s in samples if isinstance(s, BadImage)]
    assert len(bad) == 1 and bad[0].path.endswith("broken.png")
    images, labels, reported = collate_reporting_bad(samples)
    assert len(images) == len(labels) == 8 and reported == bad


def test_image_folder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs `data_dir`"):
        build_data("imagefolder")
    with pytest.raises(DataError, match="has no train/ folder"):
        build_data("imagefolder", tmp_path)


def test_unknown_dataset_and_bad_subset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="choose one of fashion-mnist, cifar10, imagefolder"):
        build_data("mnist")
    with pytest.raises(DataError, match="at least one image"):
        build_data("fashion-mnist", fake_fashion_mnist(tmp_path), train_subset=0)


def test_subsets_are_fixed_by_the_seed(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path)
    first = build_data("fashion-mnist", root, train_subset=10, seed=3).train
    again = build_data("fashion-mnist", root, train_subset=10, seed=3).train
    assert first.indices == again.indices and len(set(first.indices)) == 10  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("size", "strides"),
    [
        (28, (1, 2, 2, 2, 2)),
        (32, (1, 2, 2, 2, 2)),
        (64, (2, 2, 2, 2, 2)),
        (224, (2, 2, 2, 2, 2)),
        (8, (1, 1, 1, 2, 2)),
    ],
)
def test_strides_keep_the_last_feature_map_at_least_2x2(size: int, strides: tuple[int, ...]) -> None:
    assert strides_for_image_size(size) == strides
