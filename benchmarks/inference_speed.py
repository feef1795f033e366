"""Inference speed of RepVGG-A0 beside its training form, timm's re-parameterized A0 and ResNet-18.

Every network is timed in one process, interleaved batch by batch (median of ``--repeats``), so the
ratios hold on a shared, noisy machine. Also measured in the same run: a float32 matrix product, to
show how much of the machine's arithmetic the deployed network uses.

    python benchmarks/inference_speed.py --threads 2 --batch-size 16 --image-size 224 --repeats 15

Prints a Markdown table and the ratios the project tracks; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn

from repvgg import create_model, reparameterize
from repvgg.io.machine import cpu_features
from repvgg.runtime.device import device_name
from repvgg.runtime.measure import count_macs, time_interleaved
from repvgg.runtime.optimize import optimize


def gemm_gflops(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """Float32 matrix-product speed (GFLOP/s): the machine's practical peak for dense arithmetic."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e9


def timm_repvgg_a0() -> nn.Module | None:
    try:
        import timm
        from timm.utils.model import reparameterize_model
    except ImportError:
        return None
    return reparameterize_model(timm.create_model("repvgg_a0", pretrained=False).eval())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backends", nargs="+", default=["eager", "inductor", "onnxruntime"])
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    from torchvision.models import resnet18

    a0_train = create_model("repvgg_a0").eval()
    a0_deploy = reparameterize(a0_train)
    resnet = resnet18().eval()
    runners: dict[str, Any] = {
        "A0 training form, eager": a0_train,
        "A0 deploy form, eager": a0_deploy,
        "ResNet-18, eager": resnet,
    }
    timm_a0 = timm_repvgg_a0()
    if timm_a0 is not None:
        runners["timm repvgg_a0 re-parameterized, eager"] = timm_a0
    notes: dict[str, str] = {}
    for label, model in (("A0 deploy form", a0_deploy), ("ResNet-18", resnet)):
        for backend in args.backends:
            name = f"{label}, {backend}" + (" channels_last" if backend == "eager" else "")
            start = time.perf_counter()
            try:
                runners[name] = optimize(
                    model, backend, example_input=inputs, channels_last=backend != "onnxruntime"
                )
            except Exception as error:  # report and go on: one backend missing must not stop the rest
                notes[name] = f"not measured: {error}"
                continue
            notes[name] = f"built in {time.perf_counter() - start:.0f} s"
    gemm = gemm_gflops(args.threads)
    measured = time_interleaved(runners, inputs, warmup=2, rounds=args.repeats)
    gemm = max(gemm, gemm_gflops(args.threads))
    macs = count_macs(a0_deploy, (1, 3, args.image_size, args.image_size))
    speed = {name: result.images_per_s for name, result in measured.items()}
    a0_best = max((k for k in speed if k.startswith("A0 deploy")), key=speed.__getitem__)
    resnet_best = max((k for k in speed if k.startswith("ResNet-18")), key=speed.__getitem__)
    ratios = {
        "deploy eager / training eager (A0)": speed["A0 deploy form, eager"]
        / speed["A0 training form, eager"],
        "deploy A0 eager / ResNet-18 eager": speed["A0 deploy form, eager"] / speed["ResNet-18, eager"],
        f"best A0 ({a0_best}) / best ResNet-18 ({resnet_best})": speed[a0_best] / speed[resnet_best],
    }
    if timm_a0 is not None:
        ratios[f"best A0 ({a0_best}) / timm re-parameterized A0, eager"] = (
            speed[a0_best] / speed["timm repvgg_a0 re-parameterized, eager"]
        )
    useful = 2 * macs * speed[a0_best] / 1e9
    print(
        f"CPU: {device_name(torch.device('cpu'))}; batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, float32; torch {torch.__version__}; "
        f"median of {args.repeats} interleaved batches\n"
    )
    print("| network, backend | images/s | ms/batch | spread | note |")
    print("|---|---:|---:|---:|---|")
    for name, result in measured.items():
        print(
            f"| {name} | {result.images_per_s:.1f} | {result.median_s * 1000:.0f} | {result.spread:.0%} | "
            f"{notes.get(name, '')} |"
        )
    for name, note in notes.items():
        if name not in measured:
            print(f"| {name} | - | - | - | {note} |")
    print()
    for name, ratio in ratios.items():
        print(f"- {name}: {ratio:.2f}x")
    print(
        f"- deployed A0 ({a0_best}) does {useful:.1f} useful GFLOP/s ({2 * macs / 1e9:.2f} GFLOP per image); "
        f"a float32 GEMM does {gemm:.1f} GFLOP/s here: {useful / gemm:.0%} of it"
    )
    figures = {
        "cpu": cpu_features(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "images_per_s": speed,
        "spread": {name: result.spread for name, result in measured.items()},
        "ratios": ratios,
        "a0_useful_gflops": useful,
        "gemm_gflops": gemm,
        "notes": notes,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return figures


if __name__ == "__main__":
    main()
