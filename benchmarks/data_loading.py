"""Data-loading throughput of the training pipeline: images decoded and augmented per second, from an image
folder and from the same images as WebDataset shards, each with 0 and more DataLoader worker processes.

The transform is the ImageNet training one ``repvgg train`` uses (``torchvision.transforms.v2``: ToImage,
RandomResizedCrop(224, antialias=True), RandomHorizontalFlip, ToDtype(float32, scale=True), Normalize with the
ImageNet mean and std). Unless ``--data`` names an ImageNet-layout folder (train/ and val/; all of it is
written as shards), JPEG images of ImageNet's typical size (500x375, smooth shapes plus noise, so that
decoding costs what a photo's does) are made in a temporary folder. Files are read from the page cache: the
figures are the CPU's work of decoding and augmenting, not the disk's. Each pipeline first delivers warm-up
batches (worker start-up, first decodes), then ``--images`` images are timed. One core per worker process
(torch uses one thread in each); with 0 workers the main process does the work on one thread. The
pipelines alternate over ``--repeats`` runs and the median is reported, with the range of the runs and the
CPU time an image took (this process and its workers): on a busy machine that is the steadier figure.

    python benchmarks/data_loading.py --images 512 --workers 0 2
    python benchmarks/data_loading.py --smoke      # tiny and fast (the tests)

Prints a Markdown table, the CPU it ran on and the command.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, features
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from repvgg.core.info import IMAGENET_STATS
from repvgg.engine.data import Augmentation, ImageFiles, collate_reporting_bad, imagenet_transforms
from repvgg.engine.shards import ShardedImages
from repvgg.io.machine import cpu_features
from repvgg.io.shards import write_shards

SOURCES = ("imagefolder", "shards")


def synthesize(root: Path, count: int, size: tuple[int, int], classes: int, seed: int = 0) -> None:
    """``count`` training JPEGs (and one validation JPEG a class) in ``root/{train,val}/<class>/``: a blurred
    random colour field plus noise, saved at quality 90, like a photo in size and decoding cost."""
    rng = np.random.default_rng(seed)
    width, height = size
    for split, number in (("train", count), ("val", classes)):
        for index in range(number):
            folder = root / split / f"class{index % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
                size, Image.BICUBIC
            )
            noise = rng.normal(0, 12, (height, width, 3))
            pixels = np.clip(np.asarray(field, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"image{index:06d}.jpg", quality=90)


def training_transform() -> v2.Compose:
    """The ImageNet training transform of ``repvgg train`` (no augmentation policy, no random erasing)."""
    return imagenet_transforms(224, *IMAGENET_STATS, Augmentation())


def loader(source: str, data: Path, shards: Path, workers: int, batch: int) -> DataLoader[Any]:
    """The training DataLoader over ``source``, set up as training sets it up (shuffled, whole batches)."""
    transform = training_transform()
    if source == "imagefolder":
        dataset: Any = ImageFiles(data / "train", transform)
        return DataLoader(
            dataset,
            batch,
            shuffle=True,
            num_workers=workers,
            collate_fn=collate_reporting_bad,
            drop_last=True,
        )
    dataset = ShardedImages(shards / "train", transform, batch_size=batch)
    return DataLoader(dataset, batch, num_workers=workers, collate_fn=collate_reporting_bad)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (the DataLoader's workers): what
    the work cost, however busy the machine is with other work."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it has just ended
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def throughput(batches: DataLoader[Any], warmup: int, images: int) -> tuple[float, float]:
    """Images per second delivered after ``warmup`` batches, over ``images`` images (or to the epoch's
    end), and the CPU milliseconds they took each."""
    done = 0
    start = end = (0.0, 0.0)
    for number, (inputs, _, bad) in enumerate(batches):
        if bad:
            raise SystemExit(f"unreadable image in the benchmark data: {bad[0]}")
        if number == warmup - 1:
            start = (time.perf_counter(), cpu_seconds())
        elif number >= warmup:
            done += len(inputs)
            end = (time.perf_counter(), cpu_seconds())  # at every batch: workers that ended are not counted
            if done >= images:
                break
    if done == 0:
        raise SystemExit("too few images for the warm-up: raise --images")
    return done / (end[0] - start[0]), 1000 * (end[1] - start[1]) / done


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="an ImageNet-layout folder (default: synthesized JPEGs)")
    parser.add_argument("--images", type=int, default=512, help="images timed per pipeline (default 512)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10, help="classes of the synthesized images")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of every pipeline (median)")
    parser.add_argument("--smoke", action="store_true", help="a tiny fast run (small images, 0 workers)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.workers, args.batch_size, args.shard_size, args.repeats = 8, [0], 4, 5, 1
    size = (64, 48) if args.smoke else (500, 375)
    torch.set_num_threads(1)  # one core per process, as in DataLoader workers
    load = os.getloadavg()[0]
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {
        (s, w): [] for w in args.workers for s in SOURCES
    }
    with tempfile.TemporaryDirectory(prefix="data-loading-") as scratch:
        work = Path(scratch)
        data = args.data
        if data is None:
            data = work / "images"
            # enough for the timed images after the warm-up of the most workers
            synthesize(data, args.images + (max(args.workers) + 1) * args.batch_size, size, args.classes)
        start = time.perf_counter()
        summary = write_shards(data, work / "shards", shard_size=args.shard_size)
        written = time.perf_counter() - start
        for repeat in range(args.repeats):  # alternate, so that the machine's drift hits all alike
            for source, workers in runs:
                batches = loader(source, data, work / "shards", workers, args.batch_size)
                runs[source, workers].append(throughput(batches, max(1, workers), args.images))
                print(f"{repeat + 1}/{args.repeats} {source}, {workers} workers: done", file=sys.stderr)
    cpu = cpu_features()
    train = summary["train"]
    images = f"the images of {args.data}" if args.data else f"synthesized {size[0]}x{size[1]} JPEGs"
    print(
        f"Data loading with the ImageNet training transform (224 px), batch {args.batch_size}: {args.images} "
        f"images timed after one warm-up batch a worker, median of {args.repeats} alternating runs, from "
        f"{images} ({train['samples']} training images, {train['bytes'] / train['samples'] / 1024:.0f} KiB "
        f"each on average; {train['shards']} shards, written in {written:.1f} s)."
    )
    turbo = " with libjpeg-turbo" if features.check_feature("libjpeg_turbo") else ""
    print(
        f"CPU: {cpu['model']}, {cpu['capability']} ({' '.join(cpu['flags']) or 'no listed flags'}), "
        f"{os.cpu_count()} cores, load average {load:.1f} at the start; Pillow {Image.__version__}{turbo}, "
        f"torch {torch.__version__}."
    )
    print()
    print("| source | workers | images/s | images/s per core | range of the runs | CPU ms per image |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for (source, workers), measured in runs.items():
        rates = [rate for rate, _ in measured]
        rate, cpu_ms = statistics.median(rates), statistics.median(ms for _, ms in measured)
        rows.append({"source": source, "workers": workers, "images_per_s": rate, "cpu_ms_per_image": cpu_ms})
        cells = (
            f"{rate:.1f} | {rate / max(1, workers):.1f} | {min(rates):.0f}-{max(rates):.0f} | {cpu_ms:.2f}"
        )
        print(f"| {source} | {workers} | {cells} |")
    print()
    given = sys.argv[1:] if argv is None else argv
    print(f"Command: `{shlex.join(['python', 'benchmarks/data_loading.py', *given])}`")
    return rows


if __name__ == "__main__":
    main()
