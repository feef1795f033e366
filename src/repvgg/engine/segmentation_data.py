"""Segmentation data: a set built from the real Fashion-MNIST images, and a folder format for real data.

``fashion-mnist-seg``: each sample is a ``grid x grid`` mosaic of Fashion-MNIST garments (56x56 px for the
default 2x2); every garment pixel (intensity > 0) is labelled with its garment's class + 1, the background
0. Eleven classes, deterministic samples, a horizontal flip while training.

``folder``: ``DIR/train/images/<name>.(png|jpg|jpeg)`` with ``DIR/train/masks/<name>.png`` (one class
index per pixel, 255 = ignore), the same under ``DIR/val``; images and masks are resized and cropped
together (torchvision's v2 transforms with a ``Mask``), e.g. Cityscapes after converting its label ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from repvgg.core.info import FASHION_MNIST_STATS, IMAGENET_STATS, Preprocessing
from repvgg.engine.config import SEG_DATASETS
from repvgg.engine.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist_split, seeded_subset
from repvgg.exceptions import DataError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class SegmentationBundle:
    train: Dataset[Any]
    val: Dataset[Any]
    num_classes: int
    class_names: list[str]
    in_chans: int
    image_size: int
    preprocessing: Preprocessing  # how an image file becomes an input (saved with the model for predict)


class FashionMosaics(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Mosaics of ``grid x grid`` Fashion-MNIST garments with per-pixel class masks (0 = background)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, grid: int = 2, train: bool) -> None:
        self.images, self.labels, self.grid, self.train = images, labels, grid, train
        mean, std = FASHION_MNIST_STATS
        self.normalize = v2.Normalize(mean, std)

    def __len__(self) -> int:
        return len(self.labels) // self.grid**2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = range(index * self.grid**2, (index + 1) * self.grid**2)
        image = _mosaic([self.images[i][0] for i in ids], self.grid)
        mask = _mosaic([(self.images[i][0] > 0).long() * (int(self.labels[i]) + 1) for i in ids], self.grid)
        if self.train and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return self.normalize(image[None].float() / 255), mask


def _mosaic(tiles: list[torch.Tensor], grid: int) -> torch.Tensor:
    """``grid * grid`` equally sized 2-D tiles laid out row by row."""
    rows = [torch.cat(tiles[row * grid : (row + 1) * grid], dim=1) for row in range(grid)]
    return torch.cat(rows, dim=0)


class SegmentationFolder(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``root/images/<name>.(png|jpg|jpeg)`` with ``root/masks/<name>.png``, transformed together."""

    def __init__(self, root: Path, size: int, *, train: bool) -> None:
        images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(
                f"No images in {root / 'images'}: expected <name>.png/.jpg with masks/<name>.png."
            )
        missing = [p.name for p in images if not (root / "masks" / f"{p.stem}.png").is_file()]
        if missing:
            raise DataError(
                f"{root / 'masks'} has no mask for {missing[0]}: add masks/{Path(missing[0]).stem}.png."
            )
        self.pairs = [(p, root / "masks" / f"{p.stem}.png") for p in images]
        mean, std = IMAGENET_STATS
        geometry = (
            [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        )
        self.transform = v2.Compose(
            [*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image_path, mask_path = self.pairs[index]
        try:
            with Image.open(image_path) as image_file, Image.open(mask_path) as mask_file:
                image = tv_tensors.Image(v2.functional.pil_to_tensor(image_file.convert("RGB")))
                mask = tv_tensors.Mask(v2.functional.pil_to_tensor(mask_file.convert("L"))[0])
        except OSError as error:  # PIL's errors for damaged or foreign files
            raise DataError(
                f"Cannot read {image_path} or its mask ({error}); fix or remove the pair."
            ) from error
        image, mask = self.transform(image, mask)
        return image, mask.long()


def build_segmentation_data(
    name: str,
    data_dir: str | Path | None = None,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
) -> SegmentationBundle:
    """Both splits of a segmentation set (one of :data:`SEG_DATASETS`)."""
    if name == "fashion-mnist-seg":
        fixed = {"num_classes": (num_classes, 11), "image_size": (image_size, 56)}
        for option, (given, own) in fixed.items():
            if given is not None and given != own:
                raise DataError(
                    f"fashion-mnist-seg has {own} {option.split('_')[1].replace('size', 'px images')} "
                    f"(2x2 mosaics of 28 px garments and the background), not {given}: drop `{option}`."
                )
        root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
        splits = {train: fashion_mnist_split(root, train) for train in (True, False)}
        train_set = FashionMosaics(*splits[True], train=True)
        val_set = FashionMosaics(*splits[False], train=False)
        classes, in_chans, size = ["background", *FASHION_MNIST_CLASSES], 1, 56
    elif name == "folder":
        if data_dir is None or num_classes is None:
            raise DataError("The folder dataset needs `data_dir` (with train/ and val/) and `num_classes`.")
        size = image_size or 512
        train_set = SegmentationFolder(Path(data_dir) / "train", size, train=True)
        val_set = SegmentationFolder(Path(data_dir) / "val", size, train=False)
        classes, in_chans = [str(i) for i in range(num_classes)], 3
    else:
        raise DataError(f"Unknown segmentation dataset {name!r}: choose one of {', '.join(SEG_DATASETS)}.")
    return SegmentationBundle(
        train=seeded_subset(train_set, train_subset, seed),
        val=seeded_subset(val_set, val_subset, seed),
        num_classes=len(classes),
        class_names=classes,
        in_chans=in_chans,
        image_size=size,
        preprocessing=Preprocessing(size, size, *(FASHION_MNIST_STATS if in_chans == 1 else IMAGENET_STATS)),
    )
