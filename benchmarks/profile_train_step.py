"""Where one SGD training step of RepVGG-A0 spends its time (BENCHMARKS.md, the 28 px reading):
torch.profiler's table of the slowest operators for one of our designs or timm's repvgg_a0, random weights
and images.

    python benchmarks/profile_train_step.py repopt --image-size 28 --batch-size 64
    python benchmarks/profile_train_step.py timm --image-size 28 --batch-size 64
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("design", help="a block design of ours (repvgg, online, repopt, ...) or timm")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    args = parser.parse_args()

    from torch.profiler import profile
    from train_throughput import sgd_step

    # timm in its default layout (its faster one at 224 px), ours channels_last, as `repvgg train` runs
    block = None if args.design == "timm" else args.design
    _, step, _ = sgd_step(block, block is not None, args.batch_size, args.image_size, args.in_chans, 10)
    for _ in range(3):
        step()
    with profile() as profiled:
        for _ in range(args.steps):
            step()
    print(f"{args.steps} steps; divide the times by {args.steps} for one step")
    print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
