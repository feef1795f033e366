"""Training from Hugging Face ``datasets`` read from a local folder: a ``DatasetDict`` saved with
``save_to_disk`` (memory-mapped Arrow files) or a folder of Parquet files, read as a whole or streamed.

Images are decoded from their stored bytes by :func:`repvgg.io.images.decode_image`, with the package's
rules for modes, EXIF orientation and transparency; an undecodable image becomes a :class:`BadImage`. Nothing
is fetched from the network: the Parquet reader is the one ``datasets`` ships.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from repvgg.exceptions import DataError
from repvgg.io.files import PathLike
from repvgg.io.images import BadImage, decode_image, open_image

#: The evaluation split, the first of these that the dataset has.
EVAL_SPLITS = ("validation", "val", "test")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
INSTALL = "pip install 'repvgg[train]'"
LAYOUT = (
    "a DatasetDict saved with save_to_disk, or Parquet files in train/ and validation/ (or val/ or test/)"
)
READ_BATCH = 256  # rows a stream reads at a time


@dataclass(frozen=True)
class HFSplit:
    """One split of a Hugging Face dataset, checked: where it is, its two columns and the classes.

    ``dataset`` is a memory-mapped ``datasets.Dataset`` holding only the image and label columns, or, when
    streamed, a ``datasets.IterableDataset`` over the Parquet files whose rows ``file_rows`` lists (in the
    order of the files). Either gives images as stored (bytes, not decoded).
    """

    name: str  # "train", or the evaluation split's name: "validation", "val" or "test"
    source: Path
    dataset: Any
    image_column: str
    label_column: str
    classes: tuple[str, ...]
    rows: int
    file_rows: tuple[int, ...] = ()

    @property
    def streaming(self) -> bool:
        return bool(self.file_rows)


def load_hf_splits(
    folder: PathLike, *, streaming: bool = False, cache_dir: PathLike | None = None
) -> tuple[HFSplit, HFSplit, list[str]]:
    """The training split, the evaluation split (``validation``, else ``val``, else ``test``: its
    ``name`` says which) and the class names of the dataset in ``folder``, checked.

    ``folder`` holds a ``DatasetDict`` saved with ``save_to_disk`` (memory-mapped, read where it is) or
    Parquet files as ``train/*.parquet`` and ``validation/*.parquet``. Without ``streaming``, Parquet files
    are converted once into Arrow files in the ``datasets`` cache (``cache_dir``, else its default), which
    are then memory-mapped; ``streaming`` reads the Parquet files themselves, in order, on every pass.

    The image column is ``image`` or ``img`` (the ``Image`` feature, the files' bytes, or a ``{"bytes",
    "path"}`` struct); the label column ``label`` or ``labels`` (a ``ClassLabel``, whose names are the class
    names, or integers 0..K-1, named "0".."K-1", with K one more than the largest training label).
    """
    datasets = _datasets()
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"The dataset folder {root} does not exist; give a folder holding {LAYOUT}.")
    if (root / "dataset_dict.json").is_file():
        if streaming:
            raise DataError(
                f"{root} holds a dataset saved with save_to_disk, which is memory-mapped already: read it "
                "without streaming (streaming reads folders of Parquet files)."
            )
        train, val = _saved_splits(datasets, root)
    elif (root / "state.json").is_file():
        raise DataError(
            f"{root} holds a single saved Dataset; save a DatasetDict with a 'train' and a 'validation' "
            "split instead: DatasetDict(train=..., validation=...).save_to_disk(folder)."
        )
    else:
        train, val = _parquet_splits(datasets, root, streaming, cache_dir)
    return train, val, list(train.classes)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise DataError(f"Reading Hugging Face datasets needs the `datasets` library: {INSTALL}.") from error
    return datasets


def _saved_splits(datasets: Any, root: Path) -> tuple[HFSplit, HFSplit]:
    """The two splits of a saved DatasetDict, memory-mapped where they are (no copy, nothing written)."""
    try:
        saved = datasets.load_from_disk(str(root))
    except (OSError, ValueError) as error:
        raise DataError(f"Cannot read the saved dataset in {root} ({error}); save it again.") from error
    names = list(saved.keys())
    if "train" not in names:
        raise DataError(
            f"{root} has the splits {', '.join(names)} but no 'train' split; save one as 'train'."
        )
    eval_name = _eval_name(names, root)
    splits = []
    classes: tuple[str, ...] = ()
    for name in ("train", eval_name):
        dataset = saved[name]
        where = f"the {name} split of {root}"
        image, label = _columns(datasets, dataset.features, where)
        labels = dataset.data.column(label)
        classes = _checked_classes(datasets, dataset.features[label], labels, where, classes or None)
        dataset = dataset.select_columns([image, label])  # a view: the other columns are never read
        if isinstance(dataset.features[image], datasets.Image):
            dataset = dataset.cast_column(image, datasets.Image(decode=False))  # changes the features only
        splits.append(HFSplit(name, root, dataset, image, label, classes, len(dataset)))
    return splits[0], splits[1]


def _parquet_splits(
    datasets: Any, root: Path, streaming: bool, cache_dir: PathLike | None
) -> tuple[HFSplit, HFSplit]:
    """The two splits of a folder of Parquet files, checked from the files' metadata and labels before
    ``datasets`` reads (or converts) them."""
    found = {name: sorted((root / name).glob("*.parquet")) for name in ("train", *EVAL_SPLITS)}
    if not found["train"]:
        raise DataError(f"{root} has no training split: give a folder holding {LAYOUT}.")
    eval_name = _eval_name([name for name in EVAL_SPLITS if found[name]], root)
    splits = []
    classes: tuple[str, ...] = ()
    for name in ("train", eval_name):
        files = found[name]
        where = f"the Parquet files in {root / name}"
        features, labels, file_rows = _read_parquet_metadata(datasets, files, where)
        image, label = _columns(datasets, features, where)
        classes = _checked_classes(datasets, features[label], labels[label], where, classes or None)
        if isinstance(features[image], datasets.Image):
            features[image] = datasets.Image(decode=False)
        try:
            dataset = datasets.load_dataset(
                "parquet",
                data_files={name: [str(path) for path in files]},
                split=name,
                columns=[image, label],
                features=datasets.Features({image: features[image], label: features[label]}),
                streaming=streaming,
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        except (datasets.exceptions.DatasetsError, OSError, ValueError) as error:
            raise DataError(f"Cannot read {where} ({error}); check or rewrite them.") from error
        streamed = tuple(file_rows) if streaming else ()
        splits.append(HFSplit(name, root, dataset, image, label, classes, sum(file_rows), streamed))
    return splits[0], splits[1]


def _read_parquet_metadata(datasets: Any, files: list[Path], where: str) -> tuple[Any, Any, list[int]]:
    """The features of ``files`` (from the first one's schema), all their label-like columns, and the rows
    of each file; a damaged file, or files that disagree on a column's type, are refused by name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features, first, tables, file_rows = None, "", [], []
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            if features is None:
                features, first = datasets.Features.from_arrow_schema(schema), path.name
            wanted = [name for name in LABEL_COLUMNS if name in features]
            for name in (column for column in IMAGE_COLUMNS + LABEL_COLUMNS if column in features):
                index = schema.get_field_index(name)
                if index < 0 or schema.field(index).type != features.arrow_schema.field(name).type:
                    raise ValueError(f"its column {name} is missing, or not of the type it has in {first}")
            tables.append(parquet.read(columns=wanted))
            file_rows.append(parquet.metadata.num_rows)
        except (OSError, ValueError, pa.ArrowException) as error:
            raise DataError(f"Cannot read {path} ({error}); rewrite it or remove it from {where}.") from error
    return features, pa.concat_tables(tables), file_rows


def _eval_name(names: list[str], root: Path) -> str:
    name = next((name for name in EVAL_SPLITS if name in names), None)
    if name is None:
        raise DataError(
            f"{root} has no evaluation split: add one named {', '.join(EVAL_SPLITS[:-1])} or "
            f"{EVAL_SPLITS[-1]} ({LAYOUT})."
        )
    return name


def _columns(datasets: Any, features: Any, where: str) -> tuple[str, str]:
    """The names of the image and label columns in ``features``, checked to hold images and integers."""
    image = next((name for name in IMAGE_COLUMNS if name in features), None)
    label = next((name for name in LABEL_COLUMNS if name in features), None)
    if image is None or label is None:
        kind, wanted = ("image", IMAGE_COLUMNS) if image is None else ("label", LABEL_COLUMNS)
        raise DataError(
            f"No {kind} column ({' or '.join(wanted)}) in {where}, whose columns are "
            f"{', '.join(features) or 'none'}: rename the {kind} column to {wanted[0]}."
        )
    feature = features[image]
    holds_bytes = isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")
    holds_struct = isinstance(feature, dict) and "bytes" in feature
    if not (isinstance(feature, datasets.Image) or holds_bytes or holds_struct):
        raise DataError(
            f"The column {image} of {where} holds {feature}, not images: it needs the Image feature or the "
            "image files' bytes."
        )
    feature = features[label]
    if not isinstance(feature, datasets.ClassLabel) and not (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    ):
        raise DataError(
            f"The column {label} of {where} holds {feature}, not class indices: it needs a ClassLabel or "
            "integers 0 to K-1."
        )
    return image, label


def _checked_classes(
    datasets: Any, feature: Any, labels: Any, where: str, train: tuple[str, ...] | None = None
) -> tuple[str, ...]:
    """The class names of a split's ``labels`` (``train``, the training split's, for the evaluation split):
    a ClassLabel's names, else "0".."K-1" with K one more than the largest label. Refused: a split without
    rows, rows without a label, fewer than two classes, a label that is no class, and a ClassLabel whose
    names are not the training split's."""
    import pyarrow.compute as pc

    if len(labels) == 0:
        raise DataError(f"No rows in {where}; give a split with images.")
    if labels.null_count:
        raise DataError(f"{labels.null_count} rows in {where} have no label; label or remove them.")
    extremes = pc.min_max(labels).as_py()
    named = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    classes = train or named or tuple(str(index) for index in range(max(extremes["max"] + 1, 0)))
    if len(classes) < 2:
        raise DataError(
            f"The labels in {where} name {len(classes)} class ({', '.join(classes) or 'none'}): a classifier "
            "needs at least two classes."
        )
    if named is not None and named != classes:
        raise DataError(
            f"The ClassLabel of {where} names the classes {', '.join(named)}, but the training split names "
            f"them {', '.join(classes)}; both splits need the same ClassLabel."
        )
    for label in (extremes["min"], extremes["max"]):
        if not 0 <= label < len(classes):
            raise DataError(
                f"The labels in {where} include {label}, but the dataset's {len(classes)} classes are 0 to "
                f"{len(classes) - 1}; fix or remove the rows with that label."
            )
    return classes


def _image(cell: Any, name: str, in_chans: int) -> Any:
    """The image in a row's image cell (bytes, or an Image struct of bytes or a file path) as an 8-bit PIL
    image, or a BadImage."""
    if isinstance(cell, dict):
        if cell.get("bytes") is None and cell.get("path"):
            return open_image(cell["path"], in_chans)  # an Image feature that refers to a file
        name = f"{name} ({cell['path']})" if cell.get("path") else name
        cell = cell.get("bytes")
    if cell is None:
        return BadImage(name, "the row holds no image")
    return decode_image(cell, name, in_chans)


class HFImages(Dataset[Any]):
    """A memory-mapped split (as :func:`load_hf_splits` gives it without streaming) as ``(transform(image),
    label)`` samples, or a :class:`BadImage` for an image that cannot be decoded.

    Pickling it (for data-loading processes) pickles the Arrow files' paths, not the data.
    """

    def __init__(self, split: HFSplit, transform: Callable[[Any], Any], in_chans: int = 3) -> None:
        if split.streaming:
            raise DataError(f"The {split.name} split is streamed: read it with HFStream, not HFImages.")
        self.split, self.transform, self.in_chans = split, transform, in_chans
        self.classes = list(split.classes)

    def __len__(self) -> int:
        return self.split.rows

    def __getitem__(self, index: int) -> Any:
        row = self.split.dataset[index]
        where = f"row {index} of the {self.split.name} split of {self.split.source}"
        image = _image(row[self.split.image_column], where, self.in_chans)
        return image if isinstance(image, BadImage) else (self.transform(image), row[self.split.label_column])


class HFStream(IterableDataset[Any]):
    """A streamed split (as :func:`load_hf_splits` gives it with ``streaming``) as ``(transform(image),
    label)`` samples (or :class:`BadImage`), read by the process of rank ``rank`` among ``world_size``.

    Every rank yields ``len(self) = N // world_size`` samples per epoch (N rows in all), so that DDP's ranks
    take the same number of steps. Every rank must be given the same ``seed`` and, before each epoch, the
    same :meth:`set_epoch`: then the order of the files and a buffer of ``buffer_size`` rows, filled from one
    file at a time, shuffle the rows the same way on every rank, differently in each epoch (the buffer
    mixes nearby rows only: store the rows in a random order, as datasets on the Hub are). Evaluation
    streams take ``shuffle=False``. Which rows a rank gets, from ``datasets``' ``split_dataset_by_node``:

    - Whole files (its "shards" strategy) when the files divide evenly among the ranks and all hold the
      same number of rows: each rank reads only its files, and every row goes to exactly one rank, once
      per epoch.
    - Otherwise every rank reads every file and keeps every ``world_size``-th row of the (identically
      shuffled) stream ("examples"): every row goes to at most one rank, once; the last ``N % world_size``
      rows of each epoch's order go to none. (Whole files of unequal sizes would give the ranks unequal
      shares, changing with each epoch's file order; truncating and padding them to equal counts would
      repeat some rows and skip others.)

    Among data-loading workers the rank's rows are split here, not by ``datasets`` (which deals whole
    files to workers, leaving workers, and so ranks, with unequal numbers of batches): every worker reads
    all the rank's rows and decodes only its own, whole batches of ``batch_size`` rows in turn, so that
    the loader gives the rows in the rank's order in exactly ``ceil(len / batch_size)`` batches. Give
    the loader's batch size: with another, the ranks still get equal counts of samples and of batches,
    but ``len(loader)`` undercounts. Decoding, the expensive part, is what the workers share.
    """

    def __init__(
        self,
        split: HFSplit,
        transform: Callable[[Any], Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1000,
        batch_size: int = 1,
        in_chans: int = 3,
    ) -> None:
        if not split.streaming:
            raise DataError(f"The {split.name} split is not streamed: read it with HFImages, not HFStream.")
        if not 0 <= rank < world_size or batch_size < 1 or buffer_size < 1:
            raise DataError(
                f"A stream needs 0 <= rank < world_size and a batch and buffer size of at least 1, got rank "
                f"{rank}, world_size {world_size}, batch_size {batch_size}, buffer_size {buffer_size}."
            )
        if split.rows < world_size:
            raise DataError(
                f"The {split.name} split of {split.source} has {split.rows} rows, fewer than the "
                f"{world_size} processes; give it more rows or train with fewer processes."
            )
        from datasets.distributed import split_dataset_by_node

        self.split, self.transform, self.in_chans = split, transform, in_chans
        self.classes = list(split.classes)
        self.rank, self.batch_size = rank, batch_size
        self.samples_per_rank = split.rows // world_size
        files = split.file_rows
        even = len(files) % world_size == 0 and (world_size == 1 or len(set(files)) == 1)
        one_shard_a_file = split.dataset.num_shards == len(files)  # as `datasets` streams Parquet files
        self.strategy = "shards" if even and one_shard_a_file else "examples"
        stream = split.dataset.with_format("arrow")
        if shuffle:
            # One file at a time into the buffer: interleaving files makes `datasets` sleep 5 s at the end of
            # every pass over Parquet files (a guard against a pyarrow bug with reading threads).
            stream = stream.shuffle(seed=seed, buffer_size=buffer_size, max_buffer_input_shards=1)
        self._stream = split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy=self.strategy)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` (reaches workers that persist across epochs too: ``datasets`` keeps the
        epoch in shared memory)."""
        self._stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.samples_per_rank

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        position = 0
        # IterableDataset.iter, unlike iterating the dataset, does not split it among workers itself.
        for table in self._stream.iter(batch_size=READ_BATCH):
            for row in range(table.num_rows):
                if position == self.samples_per_rank:
                    return
                if (position // self.batch_size) % workers == worker:
                    yield self._sample(table, row)
                position += 1
        if position < self.samples_per_rank:
            raise DataError(
                f"The {self.split.name} split of {self.split.source} gave rank {self.rank} {position} rows, "
                f"not {self.samples_per_rank}: its files changed while training; restart the training."
            )

    def _sample(self, table: Any, row: int) -> Any:
        cell = table.column(self.split.image_column)[row].as_py()
        where = f"an image of the {self.split.name} split of {self.split.source}"
        image = _image(cell, where, self.in_chans)
        label = table.column(self.split.label_column)[row].as_py()
        return image if isinstance(image, BadImage) else (self.transform(image), label)
