"""What the one-kept-activation path (repvgg/core/lean.py) costs in speed: SGD steps of one RepVGG-A0, in one
process, alternating between the lean path and `repvgg.core.lean.layer_by_layer()` (the layers run one by
one), channels_last, random images; prints the median step of each and their ratio (BENCHMARKS.md).

    python benchmarks/lean_activation_ab.py repopt --image-size 224 --batch-size 16 --in-chans 3 --rounds 5
    python benchmarks/lean_activation_ab.py online --image-size 28 --batch-size 128 --in-chans 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("design", choices=["online", "repopt", "plain"])
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8, help="alternations (2 timed steps each)")
    args = parser.parse_args()

    from train_throughput import sgd_step

    from repvgg.core.lean import layer_by_layer

    _, step, _ = sgd_step(args.design, True, args.batch_size, args.image_size, args.in_chans, 10)

    times: dict[str, list[float]] = {"lean": [], "layer by layer": []}
    for _ in range(args.rounds):
        for path in times:
            with layer_by_layer() if path == "layer by layer" else contextlib.nullcontext():
                step()  # the first step of each path warms its kernels
                start = time.perf_counter()
                step()
                step()
                times[path].append((time.perf_counter() - start) / 2)
    medians = {path: statistics.median(values) for path, values in times.items()}
    for path, median in medians.items():
        print(
            f"{args.design} {args.image_size} px batch {args.batch_size}, {path}: "
            f"{median * 1000:.1f} ms a step"
        )
    print(f"lean speed / layer by layer: {medians['layer by layer'] / medians['lean']:.3f}")


if __name__ == "__main__":
    main()
