"""What page faults cost CPU inference: float32 RepVGG-A0 at 224 px, ours (eager channels_last, and
onnxruntime) beside timm's re-parameterized repvgg_a0 in eager mode, with torch's CPU allocator as it is and
with its transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``: allocations of 2 MiB and up are advised huge
pages, so a fresh activation takes 512x fewer page faults).

Each setting runs in fresh processes (torch reads the variable once), alternating default, hugepages,
default, ...; inside a process the three networks are timed interleaved. The first rows give the cost of a
fresh 38 MiB tensor (the stem's output at batch 16) against a reused one.

    python benchmarks/allocator.py --batch-size 16 --repeats 2 --json benchmarks/results/allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SETTINGS = ("default", "hugepages")


def child(setting: str, batch: int, size: int, rounds: int) -> dict[str, float]:
    """Images/s of each network (and the fresh/reused tensor costs) under ``setting``, in this process."""
    if setting == "hugepages":  # read by torch's CPU allocator once, at its first allocation
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    import timm
    import torch
    from timm.utils.model import reparameterize_model

    from repvgg import create_model, optimize, reparameterize
    from repvgg.runtime.measure import time_interleaved

    shape = (batch, 48, size // 2, size // 2)
    held = torch.empty(shape)
    touched = time_interleaved(
        {
            "fresh tensor, ms": lambda _: torch.empty(shape).fill_(1.0),
            "reused tensor, ms": lambda _: held.fill_(1.0),
        },
        held,
    )
    costs = {name: result.median_s * 1000 for name, result in touched.items()}
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    ours = reparameterize(create_model("repvgg_a0").eval())
    networks = {
        "ours, eager": optimize(ours, "eager", example_input=images),
        "ours, onnxruntime": optimize(ours, "onnxruntime", example_input=images),
        "timm, eager": reparameterize_model(timm.create_model("repvgg_a0").eval()),
    }
    with torch.inference_mode():
        measured = time_interleaved(networks, images, rounds=rounds)
    return {**costs, **{name: result.images_per_s for name, result in measured.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch_size, args.image_size, args.rounds)))
        return
    runs: dict[str, list[dict[str, float]]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            command = [sys.executable, __file__, "--child", setting, "--batch-size", str(args.batch_size)]
            command += ["--image-size", str(args.image_size), "--rounds", str(args.rounds)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(result.stdout.strip().splitlines()[-1]))
    table = {s: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for s, rows in runs.items()}
    import torch

    from repvgg.io.machine import cpu_features
    from repvgg.runtime.device import device_name

    print(f"{device_name(torch.device('cpu'))}; batch {args.batch_size}, {args.image_size} px, float32\n")
    keys = list(table["default"])
    print("| measure | " + " | ".join(SETTINGS) + " |\n|---|" + "---:|" * len(SETTINGS))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{table[s][key]:.2f}" for s in SETTINGS) + " |")
    print("\nvs timm eager in the same process (images/s ratios):")
    for setting in SETTINGS:
        timm_here = table[setting]["timm, eager"]
        for name in ("ours, eager", "ours, onnxruntime"):
            print(f"- {setting}: {name} / timm = {table[setting][name] / timm_here:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            record = {"settings": vars(args), "cpu": cpu_features(), "runs": runs, "medians": table}
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
