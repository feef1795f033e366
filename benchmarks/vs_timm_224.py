"""The precision search at the paper's size, against timm: RepVGG-A0 (ImageNet shape, 224 px) with every
backend and precision ``optimize`` has, timed interleaved beside timm's re-parameterized repvgg_a0 in eager
float32 (the baseline issue 17 sets its targets against).

With ``--checkpoint`` and ``--data-dir`` (an ImageFolder with ``train/`` and ``val/``) the model is a trained
one and the guard is a real top-1 drop on its held-out ``val/`` images at the checkpoint's image size, with
calibration on ``train/`` images (timm's A0 is built with the same classes and input channels). Without
them (no ImageNet here) the model has random weights (randomized BatchNorm statistics), the judged images are
random and labelled with float32's own predictions, so "top-1" is agreement with float32: a speed check only.

    python benchmarks/vs_timm_224.py --batch-size 16 --json benchmarks/results/vs_timm_224.json
    python benchmarks/vs_timm_224.py --checkpoint runs/footwear-224/model_train.safetensors \
        --data-dir data/footwear-large --json benchmarks/results/vs_timm_224_trained.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from repvgg import create_model, optimize, randomize_batchnorm_, reparameterize
from repvgg.io.machine import cpu_features
from repvgg.runtime.device import device_name
from repvgg.runtime.measure import time_interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--judged", type=int, default=256, help="random images the candidates are judged on")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--max-drop", type=float, default=2.0, help="allowed disagreement with fp32, points")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--checkpoint", default=None, help="a trained float checkpoint (else random weights)")
    parser.add_argument("--data-dir", default=None, help="its ImageFolder (train/, val/); with --checkpoint")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if bool(args.checkpoint) != bool(args.data_dir):
        parser.error("--checkpoint and --data-dir go together")

    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    batch = args.batch_size
    if args.checkpoint:
        model, judged, calibration, size = trained_model_and_data(args)
        labels = torch.cat([targets for _, targets in judged])
    else:
        model = create_model("repvgg_a0").eval()
        randomize_batchnorm_(model)
        size = args.image_size
        generator = torch.Generator().manual_seed(1)
        judged_images = torch.randn(args.judged, 3, size, size, generator=generator)
        deployed = reparameterize(model)
        with torch.inference_mode():
            labels = torch.cat([deployed(chunk).argmax(1) for chunk in judged_images.split(batch)])
        judged = list(zip(judged_images.split(batch), labels.split(batch), strict=True))
        calibration = list(torch.randn(args.calib, 3, size, size, generator=generator).split(batch))
    example = judged[0][0]
    start = time.perf_counter()
    chosen = optimize(
        model,
        "auto",
        precision="auto",
        example_input=example,
        calibration=calibration,
        eval_data=judged,
        max_top1_drop=args.max_drop,
        repeats=args.repeats,
    )
    search_seconds = time.perf_counter() - start
    best_fp32 = max(
        (row for row in chosen.report if row.precision == "fp32" and row.images_per_s),
        key=lambda row: row.images_per_s,
    )
    fp32 = optimize(model, best_fp32.backend, example_input=example)
    timm_a0 = timm.create_model(
        "repvgg_a0", pretrained=False, num_classes=model.num_classes, in_chans=model.in_chans
    )
    timm_a0 = reparameterize_model(timm_a0.eval())
    with torch.inference_mode():
        measured = time_interleaved(
            {
                "timm repvgg_a0, eager fp32": timm_a0,
                f"ours, best fp32 ({best_fp32.backend})": fp32,
                f"ours, chosen ({chosen.backend} {chosen.precision})": chosen,
            },
            example,
            rounds=args.repeats,
        )
    timm_speed = measured["timm repvgg_a0, eager fp32"].images_per_s
    judged_on = (
        f"{len(labels)} held-out images of {args.data_dir} (top-1 on their labels)"
        if args.checkpoint
        else f"{len(labels)} random images (agreement with fp32)"
    )
    print(
        f"{device_name(torch.device('cpu'))}; batch {batch}, {size}x{size}; judged on {judged_on}, guard "
        f"{args.max_drop} points; search {search_seconds:.0f} s\n"
    )
    if not args.checkpoint:
        classes = int(labels.unique().numel())
        print(
            f"float32 predicts {classes} distinct class(es) on the judged images: "
            + (
                "the agreement column says little (a random network), only speed counts here\n"
                if classes < 10
                else "\n"
            )
        )
    print("| candidate | precision | images/s (search run) | top-1 | drop | agreement | chosen / why not |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in chosen.report:
        speed = f"{row.images_per_s:.1f}" if row.images_per_s else "-"
        top1 = f"{row.top1:.2f}" if row.top1 is not None else "-"
        drop = f"{row.top1_drop:+.2f}" if row.top1_drop is not None else "-"
        agreement = f"{row.agreement:.2f}%" if row.agreement is not None else "-"
        cells = f"{speed} | {top1} | {drop} | {agreement}"
        print(f"| {row.backend} | {row.precision} | {cells} | {row.why_not or 'chosen'} |")
    print("\n| network (one interleaved run) | images/s | vs timm eager fp32 |")
    print("|---|---:|---:|")
    for name, result in measured.items():
        print(f"| {name} | {result.images_per_s:.1f} | {result.images_per_s / timm_speed:.2f}x |")
    if args.json:
        record = {
            "cpu": cpu_features(),
            "settings": vars(args),
            "search_seconds": search_seconds,
            "checkpoint": args.checkpoint,
            "judged_images": len(labels),
            "report": [vars(row) for row in chosen.report],
            "versus_timm": {name: result.images_per_s for name, result in measured.items()},
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


def trained_model_and_data(
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor], int]:
    """The checkpoint, its held-out images and labels in batches, calibration batches and its image size."""
    from repvgg import load_checkpoint
    from repvgg.engine.data import build_data, calibration_images

    model = load_checkpoint(args.checkpoint).eval()
    size = model.preprocessing.image_size
    bundle = build_data("imagefolder", args.data_dir, image_size=size)
    loader = torch.utils.data.DataLoader(bundle.val, args.batch_size)
    judged = [(images, labels) for images, labels in loader]
    calibration = [
        images for images, _ in torch.utils.data.DataLoader(calibration_images(bundle, args.calib, 0), 16)
    ]
    return model, judged, calibration, size


if __name__ == "__main__":
    main()
