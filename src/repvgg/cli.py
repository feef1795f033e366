"""The ``repvgg`` command line. Heavy imports (torch) happen inside the commands, not at start-up."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence


def _models_table(args: argparse.Namespace) -> int:
    import torch

    from repvgg.benchmark import count_macs, count_parameters
    from repvgg.models import MODEL_SPECS, create_model

    rows = []
    for name, spec in MODEL_SPECS.items():
        with torch.device("meta"):  # shapes only: no memory, no arithmetic
            train = create_model(name)
            deploy = create_model(name, deploy=True)
        rows.append(
            {
                "model": name,
                "train_params": count_parameters(train),
                "deploy_params": count_parameters(deploy),
                "gmacs_224": round(count_macs(deploy) / 1e9, 3),
                "paper_params_m": spec.paper_params_m,
                "paper_top1": spec.paper_top1,
                "top1_source": spec.top1_source,
            }
        )
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    header = ["model", "train params", "deploy params", "GMACs @224", "paper params (M)", "paper top-1"]
    cells = [
        [
            row["model"],
            f"{row['train_params']:,}",
            f"{row['deploy_params']:,}",
            f"{row['gmacs_224']:.3f}",
            f"{row['paper_params_m']:.2f}" if row["paper_params_m"] else "-",
            f"{row['paper_top1']:.2f}" if row["paper_top1"] else "-",
        ]
        for row in rows
    ]
    sources = "; ".join(sorted({row["top1_source"] for row in rows if row["top1_source"]}))
    if args.format == "markdown":
        print("| " + " | ".join(header) + " |")
        print("|---|" + "---:|" * (len(header) - 1))
        for line in cells:
            print("| " + " | ".join(line) + " |")
        print(f"\nPaper top-1 (ImageNet) from: {sources}.")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="RepVGG models (parameters and MACs counted on this package's models)")
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right")
    for line in cells:
        table.add_row(*line)
    console = Console()
    console.print(table)
    console.print(f"Paper top-1 (ImageNet) from: {sources}.")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from repvgg.benchmark import compare_throughput, count_parameters
    from repvgg.models import create_model
    from repvgg.reparam import randomize_batchnorm_, reparameterize, verify_equivalence

    torch.manual_seed(0)
    print(f"Building {args.model} (training form) ...")
    model = create_model(args.model)
    # A fresh model has identity BatchNorms, which would make the check below too easy.
    randomize_batchnorm_(model, seed=0).eval()
    deployed = reparameterize(model)
    train_params, deploy_params = count_parameters(model), count_parameters(deployed)
    print(
        f"parameters: training form {train_params:,}, deploy form {deploy_params:,} "
        f"({1 - deploy_params / train_params:.1%} fewer)"
    )
    report = verify_equivalence(model)
    print(f"equivalence (random BN statistics, eval mode): {report}")
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    print(
        f"timing on CPU ({torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, fp32, median of {args.repeats} interleaved batches) ..."
    )
    speeds = compare_throughput(
        {"training form": model, "deploy form": deployed}, inputs, repeats=args.repeats
    )
    for name, speed in speeds.items():
        print(
            f"  {name:14s} {speed.images_per_s:7.1f} images/s  "
            f"({speed.median_s * 1000:.0f} ms/batch, spread {speed.spread:.0%})"
        )
    ratio = speeds["deploy form"].images_per_s / speeds["training form"].images_per_s
    print(f"  deploy / training speed: {ratio:.2f}x")
    return 0 if report.passed else 1


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repvgg",
        description="RepVGG: train multi-branch, convert exactly to plain 3x3 conv + ReLU, deploy.",
    )
    from repvgg import __version__

    parser.add_argument("--version", action="version", version=f"repvgg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="table of every model: parameters, MACs, paper top-1")
    models.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    models.set_defaults(run=_models_table)

    demo = commands.add_parser("demo", help="build a model, convert it, check exactness and speed")
    demo.add_argument("--model", default="repvgg_a0")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--image-size", type=int, default=224)
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from repvgg.exceptions import RepVGGError

    run: Command = args.run
    try:
        return run(args)
    except RepVGGError as error:
        print(f"repvgg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"repvgg {args.command}: interrupted", file=sys.stderr)
        return 130
