"""``optimize(precision="auto")`` on a trained checkpoint: every backend and precision, judged on held-out
images and timed in one interleaved run, with the CPU's capability beside the figures.

    python benchmarks/precision_search.py runs/a0-fmnist/model_train.safetensors --val-subset 2000 \
        --calib 512 --batch-size 64 --json benchmarks/results/precision_search.json

Calibration images come from the training split, the judged images from the validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader

from repvgg import load_checkpoint, optimize
from repvgg.engine.data import build_data, calibration_images, collate_reporting_bad
from repvgg.io.machine import cpu_features
from repvgg.runtime.device import device_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--val-subset", type=int, default=2000)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_checkpoint(args.checkpoint).eval()
    bundle = build_data(args.data, args.data_dir, val_subset=args.val_subset)
    loader = DataLoader(bundle.val, args.batch_size, collate_fn=collate_reporting_bad)
    calibration = DataLoader(
        calibration_images(bundle, args.calib, seed=0), args.batch_size, collate_fn=collate_reporting_bad
    )
    example = next(iter(loader))[0]
    start = time.perf_counter()
    chosen = optimize(
        model,
        "auto",
        precision="auto",
        example_input=example,
        calibration=(images for images, *_ in calibration),
        eval_data=loader,
        max_top1_drop=args.max_drop,
        repeats=args.repeats,
    )
    seconds = time.perf_counter() - start
    eager = next(r for r in chosen.report if (r.backend, r.precision) == ("eager", "fp32"))
    print(
        f"{args.checkpoint} on {device_name(torch.device('cpu'))}; batch {args.batch_size}, "
        f"{bundle.image_size} px; {args.val_subset} held-out images, {args.calib} calibration images; guard "
        f"{args.max_drop} points; search took {seconds:.0f} s\n"
    )
    print("| backend | precision | images/s | vs eager fp32 | top-1 | drop | agreement | chosen / why not |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for row in chosen.report:
        speed = f"{row.images_per_s:.0f}" if row.images_per_s else "-"
        ratio = (
            f"{row.images_per_s / eager.images_per_s:.2f}x"
            if row.images_per_s and eager.images_per_s
            else "-"
        )
        top1 = f"{row.top1:.2f}" if row.top1 is not None else "-"
        drop = f"{row.top1_drop:+.2f}" if row.top1_drop is not None else "-"
        agreement = f"{row.agreement:.2f}%" if row.agreement is not None else "-"
        print(
            f"| {row.backend} | {row.precision} | {speed} | {ratio} | {top1} | {drop} | {agreement} | "
            f"{row.why_not or 'chosen'} |"
        )
    if args.json:
        record = {
            "cpu": cpu_features(),
            "device": device_name(torch.device("cpu")),
            "settings": vars(args),
            "search_seconds": seconds,
            "chosen": {"backend": chosen.backend, "precision": chosen.precision},
            "report": [vars(row) for row in chosen.report],
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
