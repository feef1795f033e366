"""Write a small ImageFolder dataset of your own kind: 64 px RGB pictures of circles, squares and triangles
in random colours, sizes and places, on noisy backgrounds, half PNG and half JPEG.

    python examples/make_shapes.py data/shapes --train 300 --val 100

It stands for the photos a user brings: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``, the layout
``repvgg train --data imagefolder`` reads (torchvision's ImageFolder).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
SIZE = 64


def draw(shape: str, rng: random.Random) -> Image.Image:
    background = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    pixels = image.load()
    for _ in range(SIZE * SIZE // 8):  # sparse noise, so that the background is not a flat colour
        x, y = rng.randrange(SIZE), rng.randrange(SIZE)
        pixels[x, y] = tuple(rng.randrange(256) for _ in range(3))
    colour = tuple((c + 96 + rng.randrange(64)) % 256 for c in background)  # visible against the background
    radius = rng.uniform(10, 22)
    cx, cy = rng.uniform(radius, SIZE - radius), rng.uniform(radius, SIZE - radius)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        corners = 4 if shape == "square" else 3
        turn = rng.uniform(0, 2 * math.pi)
        points = [
            (
                cx + radius * math.cos(turn + 2 * math.pi * k / corners),
                cy + radius * math.sin(turn + 2 * math.pi * k / corners),
            )
            for k in range(corners)
        ]
        pen.polygon(points, fill=colour)
    return image


def write(root: Path, train: int, val: int, seed: int) -> None:
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", val)):
        for shape in CLASSES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                suffix = ".png" if index % 2 == 0 else ".jpg"
                draw(shape, rng).save(folder / f"{shape}_{index:04d}{suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the dataset folder to write")
    parser.add_argument("--train", type=int, default=300, help="training images per class")
    parser.add_argument("--val", type=int, default=100, help="validation images per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    write(args.root, args.train, args.val, args.seed)
    print(f"wrote {len(CLASSES) * (args.train + args.val)} images of {', '.join(CLASSES)} to {args.root}")


if __name__ == "__main__":
    main()
