"""Where float32 inference time goes in the deployed A0 (eager, channels_last), layer shape by layer shape,
and what the stem costs written other ways: the evidence behind "float32 is bound by the convolutions".

Per layer: milliseconds per batch and useful GFLOP/s (2 x multiply-adds of the convolution as defined, over
its measured time). The stem (3 -> 48 channels, 3x3, stride 2) is then timed as the direct convolution and
as three exact rewrites: space-to-depth (a 2x2 convolution over 12 channels), unfold + matrix product, and
unfold + a 1x1 convolution.

    python benchmarks/fp32_layers.py --batch-size 16 --image-size 224
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from repvgg import create_model, reparameterize
from repvgg.runtime.device import device_name
from repvgg.runtime.measure import time_interleaved


def conv_flops(weight_shape: list[int], output_elements: int) -> float:
    """2 x multiply-adds of a convolution: every output element sums in_channels/groups x kh x kw products."""
    _, per_group, kh, kw = weight_shape
    return 2.0 * output_elements * per_group * kh * kw


def per_layer(model: torch.nn.Module, images: torch.Tensor, rounds: int) -> list[tuple[str, float, float]]:
    """(layer shape, ms per batch, GFLOP/s) of each convolution shape, most time first."""
    outputs: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}

    def remember(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        outputs[(tuple(inputs[0].shape), tuple(module.weight.shape))] = output.numel()

    hooks = [m.register_forward_hook(remember) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(images)
    for hook in hooks:
        hook.remove()
    with torch.inference_mode():
        for _ in range(2):
            model(images)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(rounds):
                model(images)
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key != "aten::mkldnn_convolution":
            continue
        shape, weight = event.input_shapes[0], event.input_shapes[1]
        calls_per_batch = event.count / rounds
        ms = event.self_cpu_time_total / 1000 / rounds
        flops = conv_flops(weight, outputs[(tuple(shape), tuple(weight))]) * calls_per_batch
        label = f"{shape[1]}->{weight[0]} ch, {shape[2]}x{shape[3]} in, x{calls_per_batch:.0f}"
        rows.append((label, ms, flops / (ms / 1000) / 1e9))
    return sorted(rows, key=lambda row: -row[1])


def stem_rewrites(
    weight: torch.Tensor, bias: torch.Tensor
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The 3x3 stride-2 stem convolution, and exact rewrites of it."""
    out_channels, in_channels = weight.shape[:2]
    # space-to-depth: input row 2u-1 is (R=u-1, parity 1), 2u is (u, 0), 2u+1 is (u, 1)
    s2d = torch.zeros(out_channels, in_channels, 2, 2, 2, 2)  # o, c, row parity, col parity, tap i, tap j
    taps = {(1, 0): 0, (0, 1): 1, (1, 1): 2}  # (parity, tap) -> kernel row or column
    for (row_parity, i), kr in taps.items():
        for (col_parity, j), kc in taps.items():
            s2d[:, :, row_parity, col_parity, i, j] = weight[:, :, kr, kc]
    s2d = s2d.reshape(out_channels, in_channels * 4, 2, 2)
    flat = weight.reshape(out_channels, -1)
    channels_last = torch.channels_last

    def direct(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride=2, padding=1)

    def space_to_depth(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(F.pixel_unshuffle(x, 2), (1, 0, 1, 0)), s2d, bias)

    def unfold_matmul(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return (flat @ F.unfold(x, 3, padding=1, stride=2) + bias[:, None]).view(n, -1, h // 2, w // 2)

    def unfold_1x1(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        columns = F.unfold(x, 3, padding=1, stride=2).view(n, -1, h // 2, w // 2)
        return F.conv2d(columns.contiguous(memory_format=channels_last), flat[:, :, None, None], bias)

    return {
        "direct": direct,
        "space-to-depth": space_to_depth,
        "unfold + matmul": unfold_matmul,
        "unfold + 1x1": unfold_1x1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = reparameterize(create_model("repvgg_a0").eval()).to(memory_format=torch.channels_last)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    images = images.contiguous(memory_format=torch.channels_last)
    print(f"{device_name(torch.device('cpu'))}; deployed A0, batch {args.batch_size}, {args.image_size} px\n")
    print("| convolution | ms per batch | GFLOP/s |")
    print("|---|---:|---:|")
    for label, ms, rate in per_layer(model, images, args.rounds):
        print(f"| {label} | {ms:.1f} | {rate:.0f} |")
    stem = model.stage0.rbr_reparam
    rewrites = stem_rewrites(stem.weight.detach(), stem.bias.detach())
    reference = rewrites["direct"](images)
    print("\n| stem written as | ms per batch | max abs difference |")
    print("|---|---:|---:|")
    with torch.inference_mode():
        timed = time_interleaved(rewrites, images, rounds=10)
        for name, rewrite in rewrites.items():
            difference = float((rewrite(images) - reference).abs().max())
            print(f"| {name} | {timed[name].median_s * 1000:.1f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
