"""Training throughput and peak memory of our RepVGG-A0 beside timm's repvgg_a0, in one run: our block
(``ours``), our online re-parameterized block (``online``: one merged kernel per step) and RepOpt training
(``repopt``: a plain conv + BN whose gradients are multiplied, as ``repvgg train --block repopt`` does).

Each measurement runs in a fresh subprocess (so peak memory is the model's own) and the implementations
alternate (ours, timm, ours, timm, ...) so that machine noise hits all alike. A subprocess that crashes is
reported as such (timm's channels_last training crashes in oneDNN on AVX-512 CPUs at 96 px and up).
Throughput is the median over the timed SGD steps of every repetition. Memory is given three ways: the peak
resident set size during the steps minus the resident size just before them (ru_maxrss - VmRSS, on CPU:
what the machine sees, allocator included, which at small images retains more than the step needs); the peak
of the tensor memory allocated during one step (from no gradients: what ``torch.cuda.max_memory_allocated``
would count, exact); and what autograd keeps between the passes of one step (the distinct storages saved for
backward, parameters excepted: the activation memory OREPA reduces).

    python benchmarks/train_throughput.py --batch-size 128 --image-size 32 --in-chans 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: ours and timm's repvgg_a0, each in the default (contiguous) and in the channels_last memory format, and our
#: online and RepOpt designs in channels_last (how `repvgg train` runs them).
IMPLEMENTATIONS = (
    "ours-channels_last",
    "ours-contiguous",
    "timm-contiguous",
    "timm-channels_last",
    "online-channels_last",
    "repopt-channels_last",
)
DESIGNS = {"ours": "repvgg", "online": "online", "repopt": "repopt"}  # our implementations' blocks
DEFAULT = IMPLEMENTATIONS[:4]


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def saved_for_backward_mib(model: Any, loss: Any) -> float:
    """What autograd keeps between the forward and the backward pass of one step: the distinct storages saved
    for backward, parameters excepted (they are resident anyway). Unlike the resident-set peak it does not
    depend on the allocator, which at small images hides most of it."""
    import torch

    own = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss().backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values()) / 2**20


def peak_tensor_mib(step: Any) -> float:
    """The most tensor memory allocated during ``step()`` and live at once: the bytes of every storage an
    operator creates (views and in-place results excepted) while it lives, as a GPU's
    ``torch.cuda.max_memory_allocated`` counts. Exact, whatever the allocator; oneDNN's scratch space is not
    in it."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Tracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[Any, int]] = {}  # address -> (weak reference, bytes)
            self.current = self.peak = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            output = func(*args, **kwargs)
            for address in [a for a, (ref, _) in self.live.items() if ref.expired()]:
                self.current -= self.live.pop(address)[1]
            inputs = {
                t.untyped_storage().data_ptr()
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            for tensor in tree_leaves(output):
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                address = storage.data_ptr()
                if address and address not in inputs and address not in self.live:
                    self.live[address] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            return output

    with Tracker() as tracker:
        step()
    return tracker.peak / 2**20


def sgd_step(
    block: str | None, channels_last: bool, batch: int, size: int, in_chans: int, classes: int
) -> tuple[Any, Callable[[], None], Callable[[], Any]]:
    """RepVGG-A0 with our ``block`` design (``None``: timm's ``repvgg_a0``), random images and labels, and an
    SGD step as ``repvgg train`` takes it (RepOpt's gradient multipliers included): ``(model, step, loss)``.
    The one training step of the benchmarks (this script, profile_train_step.py, lean_activation_ab.py)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    multipliers = []
    if block is not None:
        import repvgg
        from repvgg.engine.recipe import repopt_multipliers

        model = repvgg.create_model("repvgg_a0", num_classes=classes, in_chans=in_chans, block=block)
        multipliers = repopt_multipliers(model, initialize=True)
    else:
        import timm

        model = timm.create_model("repvgg_a0", pretrained=False, num_classes=classes, in_chans=in_chans)
    model.train()
    images = torch.randn(batch, in_chans, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    labels = torch.randint(0, classes, (batch,))

    def loss() -> Any:
        return F.cross_entropy(model(images), labels)

    def step() -> None:
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        for parameter, multiplier in multipliers:
            parameter.grad.mul_(multiplier)
        optimizer.step()

    return model, step, loss


def measure(
    implementation: str, batch: int, size: int, in_chans: int, classes: int, steps: int
) -> dict[str, float]:
    """Time ``steps`` SGD steps of one implementation in this process (called in a subprocess)."""
    import resource

    library, _, layout = implementation.partition("-")
    block = DESIGNS.get(library)
    model, step, loss = sgd_step(block, layout == "channels_last", batch, size, in_chans, classes)
    step()  # warm-up: allocators, oneDNN primitives, optimizer state
    step()
    saved = saved_for_backward_mib(model, loss)
    model.zero_grad(set_to_none=True)  # a step from no gradients: they are allocated during it
    peak_tensors = peak_tensor_mib(step)
    step()  # the baseline below holds the gradients, as during training (the measurement above freed them)
    baseline = resident_mib()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "step_times": times,
        "peak_extra_mib": peak - baseline,
        "saved_mib": saved,
        "peak_tensor_mib": peak_tensors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=IMPLEMENTATIONS,
        default=list(DEFAULT),
        help="which to time (default: ours and timm's in both formats); -channels_last runs model and input "
        "in that memory format, as `repvgg train` does by default",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch_size, args.image_size, args.in_chans, args.classes, args.steps)
    if args.child:
        print(json.dumps(measure(args.child, *shape)))
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.implementations}
    crashes: dict[str, str] = {}
    for repeat in range(args.repeats):
        for implementation in runs:
            if implementation in crashes:
                continue
            command = [sys.executable, __file__, "--child", implementation]
            command += ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size)]
            command += [
                "--in-chans",
                str(args.in_chans),
                "--classes",
                str(args.classes),
                "--steps",
                str(args.steps),
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:  # a crash of the library is a result, not the end of the benchmark
                last = (result.stderr.strip().splitlines() or ["no message"])[-1]
                crashes[implementation] = f"crashed (exit {result.returncode}: {last[:80]})"
                print(f"{implementation}: {crashes[implementation]}", file=sys.stderr)
                continue
            runs[implementation].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats}: {implementation} done", file=sys.stderr)
    table = {}
    for implementation, results in runs.items():
        if implementation in crashes:
            continue
        times = [t for r in results for t in r["step_times"]]
        median = statistics.median(times)
        table[implementation] = {
            "images_per_s": args.batch_size / median,
            "spread": (max(times) - min(times)) / median,
            "peak_extra_mib": statistics.median(r["peak_extra_mib"] for r in results),
            "saved_mib": statistics.median(r["saved_mib"] for r in results),
            "peak_tensor_mib": statistics.median(r["peak_tensor_mib"] for r in results),
        }
    ratios = {  # every pair of ours and timm that ran: throughput ratio and peak-memory ratio
        f"{ours} / {timm}": {
            "throughput": table[ours]["images_per_s"] / table[timm]["images_per_s"],
            "peak_memory": table[ours]["peak_extra_mib"] / max(table[timm]["peak_extra_mib"], 1e-9),
            "saved_for_backward": table[ours]["saved_mib"] / max(table[timm]["saved_mib"], 1e-9),
            "peak_tensors": table[ours]["peak_tensor_mib"] / max(table[timm]["peak_tensor_mib"], 1e-9),
        }
        for ours in table
        if not ours.startswith("timm")
        for timm in table
        if timm.startswith("timm")
    }
    from repvgg.io.machine import cpu_features

    cpu = cpu_features()
    print(
        f"RepVGG-A0 training, CPU {cpu['model']} ({cpu['capability']} + {' '.join(cpu['flags'])}), "
        f"{os.cpu_count()} cores, torch threads default, batch {args.batch_size}, "
        f"{args.in_chans}x{args.image_size}x{args.image_size}, {args.classes} classes, fp32, "
        f"{args.repeats} alternating subprocesses x {args.steps} timed steps"
    )
    print(
        "| implementation | images/s (median) | spread | peak extra resident (MiB) | peak tensors (MiB) "
        "| kept for backward (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for implementation in runs:
        if implementation in crashes:
            print(f"| {implementation} | {crashes[implementation]} | | | |")
            continue
        row = table[implementation]
        cells = f"{row['images_per_s']:.1f} | {row['spread']:.0%} | {row['peak_extra_mib']:.0f}"
        cells += f" | {row['peak_tensor_mib']:.1f} | {row['saved_mib']:.1f}"
        print(f"| {implementation} | {cells} |")
    for pair, ratio in ratios.items():
        print(
            f"{pair}: throughput {ratio['throughput']:.2f}x, peak resident {ratio['peak_memory']:.2f}x, "
            f"peak tensors {ratio['peak_tensors']:.2f}x, kept for backward {ratio['saved_for_backward']:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as handle:
            record = {"settings": vars(args), "cpu": cpu, "results": table, "crashes": crashes}
            json.dump({**record, "ratios": ratios}, handle, indent=2)


if __name__ == "__main__":
    main()
