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

    import torch
    import torch.nn.functional as F
    from torch.profiler import profile

    torch.manual_seed(0)
    multipliers = []
    images = torch.randn(args.batch_size, args.in_chans, args.image_size, args.image_size)
    if args.design == "timm":  # timm's default layout, its faster one at 224 px
        import timm

        model = timm.create_model("repvgg_a0", num_classes=10, in_chans=args.in_chans)
    else:  # channels_last, as `repvgg train` runs
        import repvgg
        from repvgg.engine.recipe import repopt_multipliers

        model = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=args.in_chans, block=args.design)
        multipliers = repopt_multipliers(model, initialize=True)
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for parameter, multiplier in multipliers:
            parameter.grad.mul_(multiplier)
        optimizer.step()

    for _ in range(3):
        step()
    with profile() as profiled:
        for _ in range(args.steps):
            step()
    print(f"{args.steps} steps; divide the times by {args.steps} for one step")
    print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
