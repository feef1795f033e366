"""Ways to compute a training-time RepVGG block's forward and backward, timed on the shapes of A0's stages:
the three branches as they are (two convolutions), and the 3x3 and 1x1 branches as one convolution with
concatenated outputs (the 1x1 kernel zero-padded to 3x3, outputs split before their BatchNorms). Channels
last, float32; each figure is the median of 15 forward+backward passes of one block.

    python benchmarks/train_block_variants.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from repvgg.runtime.device import device_name

#: (batch, channels, map size): stage 3 and 2 of A0 at 28 px with the paper's strides (batch 128), and stage
#: 1 and 3 at 224 px (batch 32).
SHAPES = ((128, 192, 2), (128, 96, 4), (32, 48, 56), (32, 192, 14))


def median_ms(step: Callable[[], None], repeats: int = 15) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def block_steps(batch: int, channels: int, size: int) -> dict[str, Callable[[], None]]:
    """A forward and backward pass of one identity-carrying block, computed each way."""
    last = torch.channels_last
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=last).requires_grad_(True)
    w3 = torch.randn(channels, channels, 3, 3).contiguous(memory_format=last).requires_grad_(True)
    w1 = torch.randn(channels, channels, 1, 1).contiguous(memory_format=last).requires_grad_(True)
    bn3, bn1, identity = (torch.nn.BatchNorm2d(channels) for _ in range(3))

    def separate() -> None:
        out = bn3(F.conv2d(x, w3, padding=1)) + bn1(F.conv2d(x, w1)) + identity(x)
        torch.relu(out).sum().backward()

    def concatenated() -> None:
        both = F.conv2d(x, torch.cat([w3, F.pad(w1, (1, 1, 1, 1))]), padding=1)
        dense, pointwise = both.split(channels, 1)
        out = bn3(dense) + bn1(pointwise) + identity(x)
        torch.relu(out).sum().backward()

    return {"separate": separate, "concatenated": concatenated}


def main() -> None:
    torch.manual_seed(0)
    print(f"{device_name(torch.device('cpu'))}; float32, channels_last\n")
    print("| batch, channels, map | separate (ms) | concatenated (ms) | speed of concatenated vs separate |")
    print("|---|---:|---:|---:|")
    for batch, channels, size in SHAPES:
        times = {name: median_ms(step) for name, step in block_steps(batch, channels, size).items()}
        cells = f"{times['separate']:.2f} | {times['concatenated']:.2f}"
        speed = times["separate"] / times["concatenated"]
        print(f"| {batch}, {channels}, {size}x{size} | {cells} | {speed:.2f}x |")


if __name__ == "__main__":
    main()
