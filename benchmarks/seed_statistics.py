"""Top-1 of designs trained on the same seeds, and whether each is within a margin of a baseline (RESULTS.md).

Each ``--design NAME FOLDER...`` names run folders holding ``seedN/summary.json`` (what `repvgg train` and
`repvgg ablate` write). For every design beside ``--baseline``, over the seeds both have: the paired
differences, their mean and standard error, a two-sided 95% t-interval, and the one-sided 95% lower bound that
a non-inferiority test at ``--margin`` points compares with ``-margin``.

    python benchmarks/seed_statistics.py --baseline repvgg --margin 0.3 \\
        --design repvgg runs/ablate-online/repvgg runs/more-seeds/repvgg \\
        --design online runs/ablate-online/online runs/more-seeds/online \\
        --design repopt runs/repopt-paper runs/more-seeds/repopt
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density; ample for
    quantiles to three decimals)."""
    if x < 0:
        return 1.0 - student_t_cdf(-x, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    steps = 2000
    width = x / steps
    total = density(0.0) + density(x)
    total += sum((4 if i % 2 else 2) * density(i * width) for i in range(1, steps))
    return 0.5 + total * width / 3


def student_t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t (bisection on :func:`student_t_cdf`)."""
    low, high = -1000.0, 1000.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2


def read_top1(folders: list[Path]) -> dict[int, float]:
    """Top-1 by seed from ``FOLDER/seedN/summary.json`` (the training form's; its deploy form agrees)."""
    found: dict[int, float] = {}
    for folder in folders:
        for summary in sorted(folder.glob("seed*/summary.json")):
            seed = int(summary.parent.name.removeprefix("seed"))
            if seed in found:
                raise SystemExit(f"seed {seed} appears twice among {', '.join(map(str, folders))}")
            found[seed] = json.loads(summary.read_text())["train_form"]["top1"]
    return found


def compare(design: dict[int, float], baseline: dict[int, float], margin: float) -> dict[str, float]:
    """Paired statistics of ``design - baseline`` over their common seeds."""
    seeds = sorted(set(design) & set(baseline))
    differences = [design[s] - baseline[s] for s in seeds]
    n = len(differences)
    mean = statistics.fmean(differences)
    error = statistics.stdev(differences) / math.sqrt(n)
    two_sided, one_sided = student_t_quantile(0.975, n - 1), student_t_quantile(0.95, n - 1)
    lower_bound = mean - one_sided * error
    return {
        "seeds": n,
        "mean": mean,
        "std": statistics.stdev(differences),
        "standard_error": error,
        "ci95_low": mean - two_sided * error,
        "ci95_high": mean + two_sided * error,
        "one_sided_95_lower": lower_bound,
        "higher_in": sum(d > 0 for d in differences),
        "non_inferior": lower_bound > -margin,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--design", nargs="+", action="append", required=True, metavar=("NAME", "FOLDER"))
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--margin", type=float, default=0.3, help="points of top-1 (default 0.3)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    designs = {name: read_top1([Path(f) for f in folders]) for name, *folders in args.design}
    if args.baseline not in designs:
        raise SystemExit(f"--baseline {args.baseline} is not among the --design names")
    seeds = sorted(set().union(*designs.values()))
    print("| design | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std |")
    print("|---|" + "---:|" * (len(seeds) + 1))
    for name, top1 in designs.items():
        cells = [f"{top1[s]:.2f}" if s in top1 else "-" for s in seeds]
        values = list(top1.values())
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.fmean(values):.2f} +- {spread:.2f} |")
    results = {}
    print()
    for name, top1 in designs.items():
        if name == args.baseline:
            continue
        r = results[name] = compare(top1, designs[args.baseline], args.margin)
        verdict = "non-inferior" if r["non_inferior"] else "not shown non-inferior"
        print(
            f"- {name} - {args.baseline} over {r['seeds']} seeds: {r['mean']:+.2f} +- {r['std']:.2f} "
            f"per seed (standard error {r['standard_error']:.2f}; higher in {r['higher_in']}), 95% interval "
            f"{r['ci95_low']:+.2f} to {r['ci95_high']:+.2f}, one-sided 95% lower bound "
            f"{r['one_sided_95_lower']:+.2f}: {verdict} at a {args.margin} point margin"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"top1": designs, "differences": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
