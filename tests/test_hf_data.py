"""Hugging Face datasets (saved with save_to_disk, or Parquet files, read whole or streamed) as training
data: pixels and labels as stored, checked refusals, and exactly-once streaming over ranks and workers."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

import repvgg
from repvgg.engine.hf_data import HFImages, HFSplit, HFStream, load_hf_splits
from repvgg.exceptions import DataError
from repvgg.io.images import BadImage

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CLASSES = ["cat", "dog", "fox"]
TRAIN, VAL = 36, 9  # rows; a row's index (0-99 train, 100+ validation) is its top-left red value
FEATURES = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES), "note": datasets.Value("string")}
)
Row = tuple[bytes, np.ndarray, int]


def _rows(count: int, start: int, seed: int) -> list[Row]:
    """PNG images of 8-16 px with the row's index and label in the top-left pixel, labels 0, 1, 2, 0, ..."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(start, start + count):
        height, width = (int(side) for side in rng.integers(8, 17, size=2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels[0, 0, :2] = index, index % 3
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        rows.append((buffer.getvalue(), pixels, index % 3))
    return rows


TRAIN_ROWS, VAL_ROWS = _rows(TRAIN, 0, seed=1), _rows(VAL, 100, seed=2)


def _dataset(rows: list[Row]) -> Any:
    """A datasets.Dataset of ``rows`` with an Image column, a ClassLabel and a column that is not used."""
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": None} for data, _, _ in rows],
            "label": [label for _, _, label in rows],
            "note": ["unused"] * len(rows),
        },
        features=FEATURES,
    )


def _write_parquet(folder: Path, rows: list[Row], sizes: list[int]) -> None:
    """``rows`` in Parquet files of ``sizes`` rows (written by datasets: the ClassLabel is kept)."""
    folder.mkdir(parents=True)
    start = 0
    for number, size in enumerate(sizes):
        _dataset(rows[start : start + size]).to_parquet(str(folder / f"part-{number}.parquet"))
        start += size


def _write_table(path: Path, **columns: list[Any]) -> None:
    """A Parquet file of plain Arrow ``columns`` (no Hugging Face features)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _index(image: Any) -> int:
    """A transform giving the row's index, read from the decoded image."""
    return int(np.asarray(image)[0, 0, 0])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    datasets.DatasetDict(train=_dataset(TRAIN_ROWS), validation=_dataset(VAL_ROWS)).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train in 4 files of 9 rows (they divide evenly between 2 ranks), validation in val/."""
    folder = tmp_path_factory.mktemp("parquet")
    _write_parquet(folder / "train", TRAIN_ROWS, [9, 9, 9, 9])
    _write_parquet(folder / "val", VAL_ROWS, [VAL])
    return folder


def _check_round_trip(split: HFSplit, rows: list[Row]) -> None:
    view = HFImages(split, transform=np.asarray)
    assert len(view) == len(rows)
    for index, (_, pixels, label) in enumerate(rows):
        image, got = view[index]
        np.testing.assert_array_equal(image, pixels)
        assert got == label


def test_saved_dataset_round_trips_pixels_labels_and_class_names(saved: Path) -> None:
    train, val, classes = load_hf_splits(saved)
    assert classes == CLASSES and train.classes == val.classes == tuple(CLASSES)
    assert (train.name, val.name) == ("train", "validation")
    assert train.dataset.column_names == ["image", "label"]  # the unused column is never read
    _check_round_trip(train, TRAIN_ROWS)
    _check_round_trip(val, VAL_ROWS)
    original = HFImages(train, transform=_index)
    view = copy.copy(original)
    view.transform = np.asarray
    assert original[5] == (5, 2) and view[5][0].shape == TRAIN_ROWS[5][1].shape


def test_parquet_files_round_trip_and_keep_the_class_label(parquet: Path, tmp_path: Path) -> None:
    train, val, classes = load_hf_splits(parquet, cache_dir=tmp_path / "cache")
    assert classes == CLASSES and (train.name, val.name) == ("train", "val")
    _check_round_trip(train, TRAIN_ROWS)
    _check_round_trip(val, VAL_ROWS)


def test_raw_bytes_and_plain_integer_labels_name_the_classes_by_number(tmp_path: Path) -> None:
    for split, rows in (("train", TRAIN_ROWS), ("test", VAL_ROWS)):
        images, labels = [data for data, _, _ in rows], [label for _, _, label in rows]
        _write_table(tmp_path / split / "a.parquet", img=images, labels=labels)
    train, val, classes = load_hf_splits(tmp_path, cache_dir=tmp_path / "cache")
    assert classes == ["0", "1", "2"] and val.name == "test"
    assert (train.image_column, train.label_column) == ("img", "labels")
    _check_round_trip(train, TRAIN_ROWS)
    _check_round_trip(val, VAL_ROWS)


@pytest.mark.parametrize(
    ("present", "chosen"),
    [(["test", "val", "validation"], "validation"), (["test", "val"], "val"), (["test"], "test")],
)
def test_the_evaluation_split_is_chosen_by_name(tmp_path: Path, present: list[str], chosen: str) -> None:
    labels = {"train": [0, 1], "test": [0, 0], "val": [1, 1], "validation": [1, 0]}
    for split in ["train", *present]:
        _write_table(tmp_path / split / "a.parquet", image=[TRAIN_ROWS[0][0]] * 2, label=labels[split])
    _, val, _ = load_hf_splits(tmp_path, cache_dir=tmp_path / "cache")
    assert val.name == chosen
    view = HFImages(val, transform=_index)
    assert [view[row][1] for row in (0, 1)] == labels[chosen]


def _plain(tmp_path: Path, train: dict[str, list[Any]], val: dict[str, list[Any]] | None = None) -> Path:
    _write_table(tmp_path / "data" / "train" / "a.parquet", **train)
    _write_table(tmp_path / "data" / "validation" / "a.parquet", **(val or train))
    return tmp_path / "data"


IMAGES = [TRAIN_ROWS[0][0]] * 3


def _saved_dict(tmp_path: Path, **splits: Any) -> Path:
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    return tmp_path / "data"


def _only_train(tmp_path: Path) -> Path:
    _write_table(tmp_path / "data" / "train" / "a.parquet", image=IMAGES, label=[0, 1, 2])
    return tmp_path / "data"


def _damaged(tmp_path: Path) -> Path:
    folder = _plain(tmp_path, {"image": IMAGES, "label": [0, 1, 2]})
    (folder / "train" / "b.parquet").write_bytes(b"not parquet")
    return folder


def _disagreeing(tmp_path: Path) -> Path:
    folder = _plain(tmp_path, {"image": IMAGES, "label": [0, 1, 2]})
    _write_table(folder / "train" / "b.parquet", image=IMAGES, label=["0", "1", "2"])
    return folder


REFUSALS: list[tuple[str, Callable[[Path], Path], dict[str, Any], str]] = [
    ("missing folder", lambda t: t / "nowhere", {}, "does not exist"),
    ("empty folder", lambda t: t, {}, "has no training split"),
    ("no train split", lambda t: _saved_dict(t, validation=_dataset(VAL_ROWS)), {}, "no 'train' split"),
    (
        "no evaluation split",
        lambda t: _saved_dict(t, train=_dataset(TRAIN_ROWS), extra=_dataset(VAL_ROWS)),
        {},
        "no evaluation split",
    ),
    ("no evaluation files", _only_train, {}, "no evaluation split: add one named validation, val or test"),
    ("damaged Parquet file", _damaged, {}, "b.parquet"),
    ("files that disagree", _disagreeing, {}, "its column label is missing, or not of the type it has in a"),
    (
        "no image column",
        lambda t: _plain(t, {"picture": IMAGES, "label": [0, 1, 2]}),
        {},
        "No image column (image or img) in the Parquet files in",
    ),
    (
        "no label column",
        lambda t: _plain(t, {"image": IMAGES, "target": [0, 1, 2]}),
        {},
        "whose columns are image, target: rename the label column to label",
    ),
    ("not images", lambda t: _plain(t, {"image": [1, 2, 3], "label": [0, 1, 2]}), {}, "not images"),
    (
        "text labels",
        lambda t: _plain(t, {"image": IMAGES, "label": ["a", "b", "c"]}),
        {},
        "not class indices",
    ),
    ("one class", lambda t: _plain(t, {"image": IMAGES, "label": [0, 0, 0]}), {}, "at least two classes"),
    (
        "label beyond the classes",
        lambda t: _plain(t, {"image": IMAGES, "label": [0, 1, 2]}, {"image": IMAGES, "label": [0, 3, 1]}),
        {},
        "include 3, but the dataset's 3 classes are 0 to 2",
    ),
    (
        "negative label",
        lambda t: _plain(t, {"image": IMAGES, "label": [0, 1, 2]}, {"image": IMAGES, "label": [0, -1, 1]}),
        {},
        "include -1",
    ),
    (
        "missing labels",
        lambda t: _plain(t, {"image": IMAGES, "label": [0, None, 1]}),
        {},
        "1 rows in the Parquet files in",
    ),
    (
        "streaming a saved dataset",
        lambda t: _saved_dict(t, train=_dataset(TRAIN_ROWS), validation=_dataset(VAL_ROWS)),
        {"streaming": True},
        "memory-mapped already",
    ),
]


@pytest.mark.parametrize(
    ("case", "build", "options", "message"), REFUSALS, ids=[case[0] for case in REFUSALS]
)
def test_refusals_say_what_is_wrong(
    tmp_path: Path, case: str, build: Callable[[Path], Path], options: dict[str, Any], message: str
) -> None:
    folder = build(tmp_path)
    with pytest.raises(DataError, match=r"^[^\n]*[.]$") as raised:
        load_hf_splits(folder, cache_dir=tmp_path / "cache", **options)
    assert message in str(raised.value)


def test_a_single_saved_dataset_is_refused(tmp_path: Path) -> None:
    _dataset(TRAIN_ROWS).save_to_disk(str(tmp_path))
    with pytest.raises(DataError, match="single saved Dataset"):
        load_hf_splits(tmp_path)


def test_without_the_datasets_library_the_extra_is_named(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'repvgg\[train\]'"):
        load_hf_splits(saved)


def test_undecodable_images_become_bad_images(tmp_path: Path) -> None:
    rows = [(b"not an image", None, 0), (b"", None, 1), (TRAIN_ROWS[2][0], None, 2)]
    data = {"image": [data for data, _, _ in rows], "label": [label for _, _, label in rows]}
    _write_table(tmp_path / "train" / "a.parquet", **data)
    _write_table(tmp_path / "validation" / "a.parquet", **data)
    train, _, _ = load_hf_splits(tmp_path, cache_dir=tmp_path / "cache")
    view = HFImages(train, transform=_index)
    assert view[0] == BadImage(
        f"row 0 of the train split of {tmp_path}", "not an image file that Pillow can read"
    )
    assert view[1].reason == "empty file" and view[2] == (2, 2)
    streamed, _, _ = load_hf_splits(tmp_path, streaming=True, cache_dir=tmp_path / "cache")
    samples = list(HFStream(streamed, transform=_index, shuffle=False))
    assert [sample.reason for sample in samples[:2]] == [
        "not an image file that Pillow can read",
        "empty file",
    ]
    assert samples[2] == (2, 2)


def test_a_data_loader_with_two_workers_reads_every_image_once(saved: Path) -> None:
    train, _, _ = load_hf_splits(saved)
    view = HFImages(train, transform=_index)
    assert len(pickle.dumps(view)) < 20_000  # the Arrow file's path, not its data
    loader = DataLoader(view, batch_size=5, num_workers=2, shuffle=True)
    pairs = [
        (int(i), int(label)) for indices, labels in loader for i, label in zip(indices, labels, strict=True)
    ]
    assert sorted(pairs) == [(index, index % 3) for index in range(TRAIN)]


def _epoch(split: HFSplit, rank: int, epoch: int, *, workers: int = 2, batch: int = 4) -> list[int]:
    """The indices that rank ``rank`` of 2 reads in ``epoch``, through a loader with ``workers`` workers."""
    stream = HFStream(
        split, transform=_index, rank=rank, world_size=2, seed=7, buffer_size=16, batch_size=batch
    )
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers)
    batches = [indices.tolist() for indices, _ in loader]
    assert len(batches) == len(loader)
    return [index for indices in batches for index in indices]


def test_streaming_gives_each_sample_once_per_epoch_over_ranks_and_workers(
    parquet: Path, tmp_path: Path
) -> None:
    train, val, classes = load_hf_splits(parquet, streaming=True, cache_dir=tmp_path)
    assert classes == CLASSES and (train.rows, train.file_rows, val.name) == (TRAIN, (9, 9, 9, 9), "val")
    assert HFStream(train, transform=_index, world_size=2).strategy == "shards"
    orders = {}
    for epoch in (0, 1):
        ranks = [_epoch(train, rank, epoch) for rank in (0, 1)]
        assert [len(order) for order in ranks] == [TRAIN // 2] * 2
        assert sorted(ranks[0] + ranks[1]) == list(range(TRAIN))
        orders[epoch] = ranks
    assert orders[0] != orders[1]
    assert _epoch(train, 0, 0) == orders[0][0]
    assert _epoch(train, 0, 0, workers=0) == orders[0][0]  # the workers share the rank's order


@pytest.mark.parametrize("sizes", [[12, 12, 11], [12, 8, 9, 7]])
def test_streaming_files_of_unequal_sizes_still_give_each_sample_at_most_once(
    tmp_path: Path, sizes: list[int]
) -> None:
    """Whole files to ranks would give them unequal shares; every other row of one stream does not."""
    total = sum(sizes)
    _write_parquet(tmp_path / "train", TRAIN_ROWS[:total], sizes)
    _write_parquet(tmp_path / "validation", VAL_ROWS, [VAL])
    train, _, _ = load_hf_splits(tmp_path, streaming=True, cache_dir=tmp_path / "cache")
    stream = HFStream(train, transform=_index, world_size=2)
    assert (stream.strategy, len(stream)) == ("examples", total // 2)
    ranks = [_epoch(train, rank, epoch=1, batch=3) for rank in (0, 1)]
    assert [len(order) for order in ranks] == [total // 2] * 2
    assert (
        len(set(ranks[0] + ranks[1])) == total // 2 * 2
    )  # 35 rows: the last of the epoch's order is left out


def test_a_stream_decodes_pixels_and_labels_as_stored(parquet: Path, tmp_path: Path) -> None:
    _, val, _ = load_hf_splits(parquet, streaming=True, cache_dir=tmp_path)
    samples = list(HFStream(val, transform=np.asarray, shuffle=False))
    assert len(samples) == VAL
    for (image, label), (_, pixels, stored) in zip(samples, VAL_ROWS, strict=True):
        np.testing.assert_array_equal(image, pixels)
        assert label == stored


def test_persistent_workers_follow_the_epoch(parquet: Path, tmp_path: Path) -> None:
    train, _, _ = load_hf_splits(parquet, streaming=True, cache_dir=tmp_path)
    stream = HFStream(train, transform=_index, rank=1, world_size=2, seed=7, buffer_size=16, batch_size=4)
    loader = DataLoader(stream, batch_size=4, num_workers=2, persistent_workers=True)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        orders.append([index for batch, _ in loader for index in batch.tolist()])
    assert orders == [_epoch(train, 1, 0), _epoch(train, 1, 1)]


def test_each_reader_refuses_the_other_kind_of_split(parquet: Path, tmp_path: Path) -> None:
    whole, _, _ = load_hf_splits(parquet, cache_dir=tmp_path)
    streamed, _, _ = load_hf_splits(parquet, streaming=True, cache_dir=tmp_path)
    with pytest.raises(DataError, match="read it with HFStream"):
        HFImages(streamed, transform=_index)
    with pytest.raises(DataError, match="read it with HFImages"):
        HFStream(whole, transform=_index)
    with pytest.raises(DataError, match="got rank 2, world_size 2"):
        HFStream(streamed, transform=_index, rank=2, world_size=2)
    with pytest.raises(DataError, match="has 36 rows, fewer than the 40 processes"):
        HFStream(streamed, transform=_index, rank=0, world_size=40)


@pytest.mark.parametrize(("data", "fixture"), [("hf", "saved"), ("hf-stream", "parquet")])
def test_repvgg_train_runs_from_a_hugging_face_dataset(
    data: str, fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from repvgg.cli import main

    folder = request.getfixturevalue(fixture)
    run = tmp_path / "run"
    arguments = ["train", "--data", data, "--data-dir", str(folder), "--image-size", "16", "--epochs", "1"]
    arguments += ["--batch-size", "4", "--workers", "0", "--no-progress", "--output", str(run)]
    assert main(arguments) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["forms_agree"] and summary["train_form"]["images"] == VAL, "every validation row once"
    deployed = repvgg.load_checkpoint(run / "model_deploy.safetensors")
    assert deployed.class_names == CLASSES
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["train_images_per_s"] > 0
