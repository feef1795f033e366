"""Datasets and their transforms: Fashion-MNIST (built in), CIFAR-10, and ImageNet-style image folders.

Small-image sets (28-32 px) are held in memory as uint8 tensors and augmented with crops and flips;
image folders get the paper's transforms (random-resized crop 224 + flip; resize 256, centre crop 224).
All transforms come from ``torchvision.transforms.v2``.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from repvgg.core.info import (
    CIFAR10_STATS,
    FASHION_MNIST_STATS,
    IMAGENET_STATS,
    Preprocessing,
)
from repvgg.engine.config import AUGMENT_POLICIES, DATASETS
from repvgg.exceptions import DataError
from repvgg.io.images import BadImage, open_image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SMALL_IMAGE_LIMIT = 64  # images at most this size are "small": no resizing, crop-with-padding augmentation


def dataset_folder(data: str, data_dir: str | Path | None) -> str | None:
    """Where a dataset is read from, as an absolute path (so that a saved configuration works from any
    folder): ``data_dir``, or the Debian package's folder for Fashion-MNIST and its mosaics."""
    if data_dir is not None:
        return str(Path(os.path.normpath(Path(data_dir).absolute())))
    return str(FASHION_MNIST_DIR) if data.startswith("fashion-mnist") else None


@dataclass
class DataBundle:
    """The two splits of a dataset and what a model needs to know about them."""

    train: Dataset[Any]
    val: Dataset[Any]
    num_classes: int
    class_names: list[str]
    in_chans: int
    image_size: int
    in_memory: bool
    preprocessing: Preprocessing
    notes: tuple[str, ...] = ()  # what the user should know about how the images are prepared


class TensorImages(Dataset[tuple[torch.Tensor, int]]):
    """Images held as one uint8 tensor ``(N, C, H, W)`` with integer labels."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[Any], torch.Tensor]
    ) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(tv_tensors.Image(self.images[index])), int(self.labels[index])


def read_idx(path: Path) -> np.ndarray:
    """An array from an IDX file (the MNIST family's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable IDX file ({error}); reinstall the dataset.") from error


def fashion_mnist_split(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    found = {}
    for kind, suffix in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
        candidates = [root / f"{prefix}-{kind}-{suffix}.gz", root / f"{prefix}-{kind}-{suffix}"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(
                f"Fashion-MNIST is not in {root}: install it with `apt-get install dataset-fashion-mnist` "
                "(Debian/Ubuntu) or give `data_dir` a folder holding the four idx files."
            )
        found[kind] = read_idx(path)
    if len(found["images"]) != len(found["labels"]) or found["images"].ndim != 3:
        raise DataError(
            f"The Fashion-MNIST files in {root} disagree ({len(found['images'])} images, "
            f"{len(found['labels'])} labels); reinstall the dataset."
        )
    images = torch.from_numpy(found["images"].copy()).unsqueeze(1)
    labels = torch.from_numpy(found["labels"].astype(np.int64))
    refuse_labels_outside(labels, len(FASHION_MNIST_CLASSES), f"The Fashion-MNIST labels in {root}")
    return images, labels


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's python batches and refuses any object but NumPy arrays."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle_arrays(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = _ArrayUnpickler(handle, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({error}).") from error
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar10_root(data_dir: Path) -> Path:
    for root in (data_dir, data_dir / "cifar-10-batches-py"):
        if (root / "data_batch_1").is_file() and (root / "test_batch").is_file():
            return root
    raise DataError(
        f"No CIFAR-10 python batches in {data_dir}: give `data_dir` the folder `cifar-10-batches-py` "
        "(data_batch_1..5, test_batch, batches.meta) from the CIFAR-10 python version."
    )


def _cifar10_split(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    batches = [_unpickle_arrays(root / name) for name in names if (root / name).is_file()]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = torch.from_numpy(np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches]))
    refuse_labels_outside(labels, 10, f"The CIFAR-10 labels in {root}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def refuse_labels_outside(labels: torch.Tensor, classes: int, what: str) -> None:
    """One sentence, when the dataset is read, for a label that is no class (a damaged label file): it would
    end training or evaluation in an index error far from its cause."""
    outside = labels[(labels < 0) | (labels >= classes)]
    if len(outside):
        raise DataError(
            f"{what} include {int(outside[0])}, but the dataset's {classes} classes are 0 to "
            f"{classes - 1}: the label file is damaged; reinstall the dataset."
        )


def _cifar10_classes(root: Path) -> list[str]:
    meta = root / "batches.meta"
    if not meta.is_file():
        return [str(i) for i in range(10)]
    names = _unpickle_arrays(meta).get("label_names", [])
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


@dataclass(frozen=True)
class Augmentation:
    """How training images are augmented beyond crop and flip, and how every image is resized.

    ``policy`` is one of :data:`AUGMENT_POLICIES` (``magnitude`` is RandAugment's, 0-30), applied to the
    uint8 image after the crop and flip; ``random_erasing`` is the probability of erasing a random rectangle
    of the normalised training image (timm's ``reprob``); ``interpolation`` resizes both training crops and
    evaluation images, and is recorded in the checkpoint's preprocessing (the policies keep torchvision's
    own, nearest: their rotations and shears of uint8 tensors take nearest or bilinear only).
    """

    policy: str = "none"
    magnitude: int = 9
    random_erasing: float = 0.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.policy not in AUGMENT_POLICIES:
            raise DataError(
                f"Unknown augmentation {self.policy!r}: choose one of {', '.join(AUGMENT_POLICIES)}."
            )

    def policy_steps(self, small: bool) -> list[Callable[..., Any]]:
        """The policy's transform (AutoAugment takes CIFAR-10's policy for small images, ImageNet's else)."""
        if self.policy == "autoaugment":
            policy = v2.AutoAugmentPolicy.CIFAR10 if small else v2.AutoAugmentPolicy.IMAGENET
            return [v2.AutoAugment(policy)]
        if self.policy == "randaugment":
            return [v2.RandAugment(magnitude=self.magnitude)]
        if self.policy == "trivialaugment":
            return [v2.TrivialAugmentWide()]
        return []

    def erasing_steps(self) -> list[Callable[..., Any]]:
        return [v2.RandomErasing(p=self.random_erasing, value=0)] if self.random_erasing > 0 else []


def small_image_transforms(
    size: int, mean: Sequence[float], std: Sequence[float], augmentation: Augmentation
) -> v2.Compose:
    """Training transforms of 28-32 px images: crop-with-padding and flip (no resizing), the policy,
    normalisation, random erasing."""
    steps: list[Callable[..., Any]] = [
        v2.RandomCrop(size, padding=max(2, size // 8)),
        v2.RandomHorizontalFlip(),
    ]
    steps += augmentation.policy_steps(small=True)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), *augmentation.erasing_steps()]
    return v2.Compose(steps)


def imagenet_transforms(
    size: int, mean: Sequence[float], std: Sequence[float], augmentation: Augmentation
) -> v2.Compose:
    """The paper's training transforms: random-resized crop + flip, then the policy, normalisation and
    random erasing."""
    mode = v2.InterpolationMode(augmentation.interpolation)
    steps: list[Callable[..., Any]] = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
        *augmentation.policy_steps(small=False),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        *augmentation.erasing_steps(),
    ]
    return v2.Compose(steps)


def default_crop_pct(name: str) -> float:
    """The evaluation crop ratio of a dataset when none is given: the paper's 224/256 for photographs, none
    (1) for the 28-32 px sets, which are evaluated at their own size."""
    return 1.0 if name in ("fashion-mnist", "cifar10") else 7 / 8


def evaluation_preprocessing(
    size: int, stats: tuple[Sequence[float], Sequence[float]], crop_pct: float, interpolation: str
) -> Preprocessing:
    """What evaluation (and every later use of the checkpoint) does to an image: resize the shorter side to
    ``size / crop_pct``, centre crop ``size``."""
    mean, std = stats
    return Preprocessing(size, max(size, round(size / crop_pct)), tuple(mean), tuple(std), interpolation)


def evaluation_transform(preprocessing: Preprocessing, in_memory: bool) -> Callable[[Any], torch.Tensor]:
    """The evaluation transform; in-memory images at their own size (crop ratio 1) are only normalised."""
    if in_memory and preprocessing.resize == preprocessing.image_size:
        return v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(preprocessing.mean, preprocessing.std)]
        )
    return preprocessing.transform()


class ImageFiles(Dataset[Any]):
    """An ImageNet-layout split (``root/<class>/<image>``) whose unreadable files become :class:`BadImage`."""

    def __init__(self, root: Path, transform: Callable[[Any], torch.Tensor]) -> None:
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(root))
        except (FileNotFoundError, OSError) as error:
            raise DataError(
                f"No images found under {root}: expected {root}/<class name>/<image files> ({error})."
            ) from error
        self.transform = transform

    @property
    def classes(self) -> list[str]:
        return list(self.folder.classes)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def largest_side(self, sample: int = 32) -> int | None:
        """The largest side of ``sample`` files spread over the split (headers only); None if none opens."""
        from PIL import Image, UnidentifiedImageError

        step = max(1, len(self.folder.samples) // sample)
        sides = []
        for path, _ in self.folder.samples[::step][:sample]:
            try:
                with Image.open(path) as image:
                    sides.append(max(image.size))
            except (OSError, UnidentifiedImageError, ValueError):
                continue  # an unreadable file is reported where it is read for training
        return max(sides, default=None)

    def __getitem__(self, index: int) -> Any:
        path, label = self.folder.samples[index]
        image = open_image(path, in_chans=3)
        return image if isinstance(image, BadImage) else (self.transform(image), label)


def collate_reporting_bad(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    """Stack the good samples; hand the unreadable ones back to the caller to report or count."""
    bad = [item for item in batch if isinstance(item, BadImage)]
    good = [item for item in batch if not isinstance(item, BadImage)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, bad


def collate_refusing_bad(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the samples; the first unreadable one stops the work with a sentence naming it."""
    images, labels, bad = collate_reporting_bad(batch)
    if bad:
        raise bad[0].error("fix or remove it")
    return images, labels


def default_workers(bundle: DataBundle) -> int:
    """Data-loading processes: none for in-memory sets (decoding is free), else up to 8."""
    return 0 if bundle.in_memory else min(8, os.cpu_count() or 1)


def seeded_subset(dataset: Dataset[Any], size: int | None, seed: int) -> Dataset[Any]:
    """The first ``size`` samples of a fixed random permutation (all of them when None)."""
    total = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= total:
        return dataset
    if size <= 0:
        raise DataError(f"A subset must hold at least one image, got {size}.")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


def with_transform(dataset: Dataset[Any], transform: Callable[[Any], torch.Tensor]) -> Dataset[Any]:
    """A view of ``dataset`` (or of a :class:`Subset` of it) that reads its images through ``transform``."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    view = copy.copy(dataset)
    view.transform = transform  # type: ignore[attr-defined]
    return view


def calibration_images(bundle: DataBundle, count: int, seed: int = 0) -> Dataset[Any]:
    """``count`` training images drawn at random (fixed by ``seed``), prepared as for evaluation."""
    if count < 1:
        raise DataError(f"Calibration needs at least one image, got {count}.")
    evaluation = bundle.val.dataset if isinstance(bundle.val, Subset) else bundle.val
    return seeded_subset(with_transform(bundle.train, evaluation.transform), count, seed)  # type: ignore[attr-defined]


def build_data(
    name: str,
    data_dir: str | Path | None = None,
    *,
    image_size: int | None = None,
    augmentation: Augmentation | None = None,
    crop_pct: float | None = None,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
) -> DataBundle:
    """Both splits of ``name`` (one of :data:`DATASETS`) with training and evaluation transforms.

    ``crop_pct`` is the evaluation crop ratio (None: 1 for in-memory sets, the paper's 0.875 for image
    folders); it and the augmentation's interpolation are recorded in the bundle's preprocessing.
    ``rank``, ``world_size`` and ``batch_size`` (per process) place this process in a distributed run for
    the sets that split themselves among processes (``shards``, ``hf-stream``: :func:`_streamed_bundle`)."""
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}: choose one of {', '.join(DATASETS)}.")
    augmentation = augmentation or Augmentation()
    if name in ("shards", "hf", "hf-stream"):
        if name != "hf" and (train_subset is not None or val_subset is not None):
            raise DataError(
                f"{name} are read whole, in their order, so `train_subset` and `val_subset` do not apply; "
                "write a smaller set of shards (`repvgg shard`) for a quick run."
            )
        bundle = _streamed_bundle(
            name, data_dir, image_size, augmentation, crop_pct, seed, rank, world_size, batch_size
        )
        return _seeded_subsets(bundle, train_subset, val_subset, seed)  # hf only: map-style
    if name == "fashion-mnist":
        root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
        splits = {train: fashion_mnist_split(root, train) for train in (True, False)}
        classes, stats, native = FASHION_MNIST_CLASSES, FASHION_MNIST_STATS, 28
    elif name == "cifar10":
        if data_dir is None:
            raise DataError("CIFAR-10 needs `data_dir`: the folder holding cifar-10-batches-py.")
        root = _cifar10_root(Path(data_dir))
        splits = {train: _cifar10_split(root, train) for train in (True, False)}
        classes, stats, native = _cifar10_classes(root), CIFAR10_STATS, 32
    else:
        return _image_folder_bundle(
            data_dir, image_size, augmentation, crop_pct, train_subset, val_subset, seed
        )
    size = image_size or native
    if size != native:
        raise DataError(
            f"{name} images are {native} px, so `image_size` {size} is not supported: leave `image_size` out."
        )
    in_chans = int(splits[True][0].shape[1])
    preprocessing = evaluation_preprocessing(
        size, stats, crop_pct or default_crop_pct(name), augmentation.interpolation
    )
    train = TensorImages(*splits[True], small_image_transforms(size, *stats, augmentation))
    val = TensorImages(*splits[False], evaluation_transform(preprocessing, in_memory=True))
    return DataBundle(
        train=seeded_subset(train, train_subset, seed),
        val=seeded_subset(val, val_subset, seed),
        num_classes=len(classes),
        class_names=list(classes),
        in_chans=in_chans,
        image_size=size,
        in_memory=True,
        preprocessing=preprocessing,
    )


def _image_folder_bundle(
    data_dir: str | Path | None,
    image_size: int | None,
    augmentation: Augmentation,
    crop_pct: float | None,
    train_subset: int | None,
    val_subset: int | None,
    seed: int,
) -> DataBundle:
    if data_dir is None:
        raise DataError("imagefolder needs `data_dir`: a folder with train/<class>/* and val/<class>/*.")
    root = Path(data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder: expected {root}/{split}/<class name>/<images>.")
    size = image_size or 224
    preprocessing = evaluation_preprocessing(
        size, IMAGENET_STATS, crop_pct or default_crop_pct("imagefolder"), augmentation.interpolation
    )
    train = ImageFiles(root / "train", imagenet_transforms(size, *IMAGENET_STATS, augmentation))
    val = ImageFiles(root / "val", preprocessing.transform())
    if train.classes != val.classes:
        raise DataError(
            f"train/ and val/ in {root} have different class folders; both need the same class names."
        )
    if len(train.classes) < 2:
        raise DataError(
            f"{root}/train has {len(train.classes)} class folder ({', '.join(train.classes)}): a classifier "
            "needs at least two classes (one folder per class), or every image is 100% right."
        )
    notes = []
    largest = train.largest_side() if image_size is None else None
    if largest is not None and largest < size:
        notes.append(
            f"the images are at most {largest} px, so they are enlarged to the default {size} px; set the "
            f"image size to {largest} to train at their own size ({(size / largest) ** 2:.0f}x less work)"
        )
    return DataBundle(
        train=seeded_subset(train, train_subset, seed),
        val=seeded_subset(val, val_subset, seed),
        num_classes=len(train.classes),
        class_names=train.classes,
        in_chans=3,
        image_size=size,
        in_memory=False,
        preprocessing=preprocessing,
        notes=tuple(notes),
    )


def _seeded_subsets(
    bundle: DataBundle, train_subset: int | None, val_subset: int | None, seed: int
) -> DataBundle:
    return dataclasses.replace(
        bundle,
        train=seeded_subset(bundle.train, train_subset, seed),
        val=seeded_subset(bundle.val, val_subset, seed),
    )


def _streamed_bundle(
    name: str,
    data_dir: str | Path | None,
    image_size: int | None,
    augmentation: Augmentation,
    crop_pct: float | None,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int | None,
) -> DataBundle:
    """WebDataset shards (``shards``: ``DIR/train`` and ``DIR/val`` written by ``repvgg shard``), or a Hugging
    Face dataset (``hf``: memory-mapped; ``hf-stream``: Parquet files read as a stream), with the paper's
    224 px transforms, as an image folder.

    Shards and streams split themselves among processes and data-loading workers, each process reading
    only its share: training takes the same number of batches on every process (each sample at most once
    an epoch, reshuffled every epoch); evaluation counts every sample once (shards: a contiguous share per
    process; a stream: rank 0 reads it all)."""
    from repvgg.engine.hf_data import HFImages, HFStream, load_hf_splits
    from repvgg.engine.shards import ShardedImages

    if data_dir is None:
        layout = {
            "shards": "a folder with train/ and val/ shards written by `repvgg shard`",
            "hf": "a DatasetDict saved with save_to_disk, or Parquet files in train/ and validation/",
            "hf-stream": "Parquet files in train/ and validation/",
        }[name]
        raise DataError(f"{name} needs `data_dir`: {layout}.")
    root = Path(data_dir)
    size = image_size or 224
    preprocessing = evaluation_preprocessing(
        size, IMAGENET_STATS, crop_pct or default_crop_pct(name), augmentation.interpolation
    )
    train_transform = imagenet_transforms(size, *IMAGENET_STATS, augmentation)
    val_transform = preprocessing.transform()
    train: Dataset[Any]
    val: Dataset[Any]
    if name == "shards":
        train = ShardedImages(
            root / "train",
            train_transform,
            rank=rank,
            world_size=world_size,
            seed=seed,
            batch_size=batch_size,
        )
        val = ShardedImages(
            root / "val", val_transform, rank=rank, world_size=world_size, shuffle=False, whole=True
        )
        classes, val_classes = train.classes, val.classes
    else:
        train_split, val_split, classes = load_hf_splits(root, streaming=name == "hf-stream")
        val_classes = list(val_split.classes)
        if name == "hf":
            train, val = HFImages(train_split, train_transform), HFImages(val_split, val_transform)
        else:
            train = HFStream(
                train_split,
                train_transform,
                rank=rank,
                world_size=world_size,
                seed=seed,
                batch_size=batch_size or 1,
            )
            val = HFStream(val_split, val_transform, shuffle=False) if rank == 0 else EmptyShare()
    if list(classes) != list(val_classes):
        raise DataError(
            f"The training and evaluation splits in {root} name different classes; write them again."
        )
    if len(classes) < 2:
        raise DataError(f"{root} holds {len(classes)} class: a classifier needs at least two.")
    return DataBundle(
        train=train,
        val=val,
        num_classes=len(classes),
        class_names=list(classes),
        in_chans=3,
        image_size=size,
        in_memory=False,
        preprocessing=preprocessing,
    )


class EmptyShare(IterableDataset[Any]):
    """No samples: the share of an evaluation stream that rank 0 reads whole, on the other ranks."""

    transform = None

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def set_epoch(self, epoch: int) -> None:
        """Nothing to shuffle."""


def strides_for_image_size(size: int) -> tuple[int, int, int, int, int]:
    """Stage strides that keep the last feature map at least 2x2 (the paper's for 64 px and up).

    Stride-2 stages are dropped from the start, so early layers see the small image at full
    resolution, as CIFAR-style networks do: 28-32 px images get ``(1, 2, 2, 2, 2)``.
    """
    reductions = 5
    while reductions > 0 and math.ceil(size / 2**reductions) < 2:
        reductions -= 1
    return (1,) * (5 - reductions) + (2,) * reductions  # type: ignore[return-value]


def write_sample_images(bundle: DataBundle, folder: str | Path, count: int) -> list[Path]:
    """Save the first ``count`` validation images of an in-memory dataset as PNG files.

    Files are named ``<index>_<true class>.png``, so a prediction can be checked by eye. For examples
    and the demo: they turn a dataset into the image files ``repvgg predict`` reads.
    """
    from PIL import Image

    dataset, indices = bundle.val, list(range(count))
    if isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    if not isinstance(dataset, TensorImages):
        raise DataError("Sample images can be written for in-memory datasets (Fashion-MNIST, CIFAR-10) only.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in indices[: len(dataset)]:
        pixels = dataset.images[index].permute(1, 2, 0).squeeze(-1).numpy()
        label = bundle.class_names[int(dataset.labels[index])].replace("/", "-").replace(" ", "-")
        path = folder / f"{index:05d}_{label}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
