"""Ways to compute a training-time RepVGG block's forward and backward, timed on the shapes of A0's stages:
the three branches as they are (two convolutions), and the 3x3 and 1x1 branches as one convolution with
concatenated outputs (the 1x1 kernel zero-padded to 3x3, outputs split before their BatchNorms). Then, for
maps so small that most 3x3 taps land on padding (28 px images with the paper's strides), two exact ways
to skip that work: the convolution as one matrix product with a Toeplitz-form kernel, and one convolution
per output pixel with the kernel cropped to the taps that touch the image. Channels last, float32; each
figure is the median of 15 forward+backward passes, the ways of one table row interleaved; the largest
difference from the direct convolution is measured in float64.

    python benchmarks/train_block_variants.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from repvgg.runtime.device import device_name
from repvgg.runtime.measure import time_interleaved

#: (batch, channels, map size): stage 3 and 2 of A0 at 28 px with the paper's strides (batch 128), and stage
#: 1 and 3 at 224 px (batch 32).
SHAPES = ((128, 192, 2), (128, 96, 4), (32, 48, 56), (32, 192, 14))


def median_ms(steps: dict[str, Callable[[], None]], rounds: int = 15) -> dict[str, float]:
    """Median milliseconds of each step, timed interleaved by the project's one timer, with gradients on (the
    timer itself runs without)."""

    def with_grad(step: Callable[[], None]) -> Callable[[torch.Tensor], None]:
        @torch.enable_grad()
        def run(_: torch.Tensor) -> None:
            step()

        return run

    timed = time_interleaved(
        {name: with_grad(step) for name, step in steps.items()}, torch.empty(1), warmup=3, rounds=rounds
    )
    return {name: result.median_s * 1000 for name, result in timed.items()}


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


def toeplitz_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A stride-1, padding-1 3x3 convolution as one matrix product: (N, H*W*C) @ (H*W*C, H*W*O)."""
    batch, channels, height, width = x.shape
    out_channels, pixels = weight.shape[0], height * width
    tap = torch.full((pixels, pixels), 9, dtype=torch.long)  # 9: a zero appended to every kernel
    for u in range(height):
        for v in range(width):
            for a in range(3):
                for b in range(3):
                    h, w = u - 1 + a, v - 1 + b
                    if 0 <= h < height and 0 <= w < width:
                        tap[h * width + w, u * width + v] = a * 3 + b
    padded = torch.cat(
        [weight.reshape(out_channels, channels, 9), weight.new_zeros(out_channels, channels, 1)], 2
    )
    matrix = padded[:, :, tap].permute(2, 1, 3, 0).reshape(pixels * channels, pixels * out_channels)
    flat = x.permute(0, 2, 3, 1).reshape(batch, pixels * channels)
    return (flat @ matrix).view(batch, height, width, out_channels).permute(0, 3, 1, 2)


def cropped_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A stride-1, padding-1 3x3 convolution, pixel by pixel, each with the taps that touch the image."""
    height, width = x.shape[2:]
    rows = []
    for u in range(height):
        pixels = []
        for v in range(width):
            top, bottom, left, right = (
                max(0, 1 - u),
                min(3, height + 1 - u),
                max(0, 1 - v),
                min(3, width + 1 - v),
            )
            window = x[:, :, u - 1 + top : u - 1 + bottom, v - 1 + left : v - 1 + right]
            pixels.append(F.conv2d(window, weight[:, :, top:bottom, left:right]))
        rows.append(torch.cat(pixels, 3))
    return torch.cat(rows, 2)


def conv_ways(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], None]]:
    """A forward and backward pass of the 3x3 convolution of ``x`` by ``w``, computed each way."""
    return {
        "direct": lambda: F.conv2d(x, w, padding=1).sum().backward(),
        "Toeplitz": lambda: toeplitz_conv(x, w).sum().backward(),
        "cropped": lambda: cropped_conv(x, w).sum().backward(),
    }


def small_map_rows() -> list[str]:
    """Direct, Toeplitz and cropped 3x3 convolutions (forward + backward) on 2x2 and 1x1 maps."""
    rows = []
    for batch, channels, size in ((128, 192, 2), (128, 192, 1)):
        last = torch.channels_last
        x64 = torch.randn(batch, channels, size, size, dtype=torch.float64).contiguous(memory_format=last)
        w64 = torch.randn(channels, channels, 3, 3, dtype=torch.float64)
        direct64 = F.conv2d(x64, w64, padding=1)
        x = x64.float().requires_grad_(True)
        w = w64.float().contiguous(memory_format=last).requires_grad_(True)
        ways = conv_ways(x, w)
        errors = {
            "Toeplitz": float((toeplitz_conv(x64, w64) - direct64).abs().max()),
            "cropped": float((cropped_conv(x64, w64) - direct64).abs().max()),
        }

        times = median_ms(ways)
        cells = " | ".join(f"{times[name]:.2f}" for name in ways)
        rows.append(
            f"| {batch}, {channels}, {size}x{size} | {cells} | "
            f"{errors['Toeplitz']:.0e} / {errors['cropped']:.0e} |"
        )
    return rows


def main() -> None:
    torch.manual_seed(0)
    print(f"{device_name(torch.device('cpu'))}; float32, channels_last\n")
    print("| batch, channels, map | separate (ms) | concatenated (ms) | speed of concatenated vs separate |")
    print("|---|---:|---:|---:|")
    for batch, channels, size in SHAPES:
        times = median_ms(block_steps(batch, channels, size))
        cells = f"{times['separate']:.2f} | {times['concatenated']:.2f}"
        speed = times["separate"] / times["concatenated"]
        print(f"| {batch}, {channels}, {size}x{size} | {cells} | {speed:.2f}x |")
    print("\n| batch, channels, map | direct (ms) | Toeplitz (ms) | cropped (ms) | float64 difference |")
    print("|---|---:|---:|---:|---:|")
    for row in small_map_rows():
        print(row)


if __name__ == "__main__":
    main()
