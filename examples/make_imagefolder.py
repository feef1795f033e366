"""Write an ImageFolder of the kind a user brings: 64 px RGB photos, PNG and JPEG, one folder per class.

    python examples/make_imagefolder.py data/footwear

The pictures are Fashion-MNIST's *test* images of four classes (Sandal, Sneaker, Ankle boot, Bag), enlarged
to 64 px and tinted in random colours, so that a model pretrained on Fashion-MNIST's *training* images has
never seen them. Layout: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (torchvision's ImageFolder), as
``repvgg train --data imagefolder`` reads it.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image

from repvgg.engine.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist_split

CLASSES = ("Sandal", "Sneaker", "Ankle boot", "Bag")
SIZE = 64


def tinted(grey: Image.Image, rng: random.Random) -> Image.Image:
    """The garment in a random colour on a random light background, as RGB."""
    ink = tuple(rng.randrange(0, 160) for _ in range(3))
    paper = tuple(rng.randrange(170, 256) for _ in range(3))
    return Image.merge(
        "RGB",
        [
            grey.point(lambda v, a=a, b=b: round(b + (a - b) * v / 255))
            for a, b in zip(ink, paper, strict=True)
        ],
    )


def write(root: Path, data_dir: Path, train: int, val: int, seed: int) -> int:
    images, labels = fashion_mnist_split(data_dir, train=False)
    rng = random.Random(seed)
    written = 0
    for name in CLASSES:
        indices = [i for i, label in enumerate(labels.tolist()) if label == FASHION_MNIST_CLASSES.index(name)]
        rng.shuffle(indices)
        if len(indices) < train + val:
            print(f"note: {name} has {len(indices)} test images, fewer than {train} + {val}; all were used")
        folder_name = name.lower().replace(" ", "_")
        for split, chosen in (("train", indices[:train]), ("val", indices[train : train + val])):
            folder = root / split / folder_name
            folder.mkdir(parents=True, exist_ok=True)
            for count, index in enumerate(chosen):
                grey = Image.fromarray(images[index][0].numpy()).resize(
                    (SIZE, SIZE), Image.Resampling.BICUBIC
                )
                suffix = ".png" if count % 2 == 0 else ".jpg"
                tinted(grey, rng).save(folder / f"{folder_name}_{index:05d}{suffix}")
                written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the dataset folder to write")
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST's idx files")
    parser.add_argument("--train", type=int, default=150, help="training images per class")
    parser.add_argument("--val", type=int, default=50, help="validation images per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    count = write(args.root, args.data_dir, args.train, args.val, args.seed)
    print(f"wrote {count} images of {', '.join(CLASSES)} to {args.root}")


if __name__ == "__main__":
    main()
