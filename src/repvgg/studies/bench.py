"""``repvgg bench``: the paper's speed and memory claims, measured on the user's machine.

Every network is measured in one process, interleaved round by round (each round times a few batches of
every network in turn), so machine noise hits all of them alike; examples/s come from the median batch,
and the spread of all timed batches is shown beside it. Peak memory is measured in a fresh process per
network (see :func:`peak_memory_mib`). Figures and tables are written to the ``output`` folder.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repvgg.core.info import model_info
from repvgg.core.int8 import quantize_ptq
from repvgg.core.registry import MODEL_SPECS, canonical_name, create_model
from repvgg.core.reparam import reparameterize
from repvgg.exceptions import ModelConfigError
from repvgg.io.checkpoints import load_checkpoint, require_kind
from repvgg.io.files import atomic_write
from repvgg.io.jsonfile import write_json
from repvgg.runtime.device import device_name
from repvgg.runtime.measure import count_macs, count_parameters, time_interleaved
from repvgg.runtime.optimize import AsRecorded
from repvgg.runtime.progress import progress_bar

# torchvision baselines of the paper's Table 4: (top-1, examples/s on a GTX 1080Ti at batch 128).
TORCHVISION_BASELINES: dict[str, tuple[float, float]] = {
    "resnet18": (71.16, 2442),
    "resnet34": (74.17, 1419),
    "resnet50": (76.31, 719),
    "resnet101": (77.21, 430),
    "resnet152": (77.78, 297),
    "vgg16": (72.21, 415),
    "resnext50_32x4d": (77.46, 484),
    "efficientnet_b0": (75.11, 829),
    "regnet_x_3_2gf": (77.98, 671),
}
FORMS = ("train", "deploy", "int8")


@dataclass(frozen=True)
class Candidate:
    """One network to measure, named by a spec that a fresh process can rebuild it from.

    Specs: ``repvgg_a0:deploy`` / ``repvgg_a0:train`` / ``repvgg_a0:int8`` (deploy form quantized on
    random calibration input: for speed only), ``torchvision:resnet18`` (conv-BN fused, as in the
    paper), ``timm:repvgg_a0`` (timm's, re-parameterized), ``file:PATH`` (a checkpoint, as stored).
    """

    spec: str
    label: str
    family: str
    paper_top1: float | None = None
    paper_speed: float | None = None


def candidates(
    models: Sequence[str] | None = None,
    forms: Sequence[str] = ("train", "deploy"),
    baselines: Sequence[str] | None = None,
    timm_peers: bool = True,
    checkpoints: Sequence[str] = (),
) -> list[Candidate]:
    """The networks to measure: RepVGG models in each form, torchvision baselines, timm's RepVGG, and
    checkpoint files (float or INT8) as they are stored."""
    names = [canonical_name(m) for m in models] if models is not None else list(MODEL_SPECS)
    chosen_baselines = list(TORCHVISION_BASELINES) if baselines is None else list(baselines)
    unknown = [b for b in chosen_baselines if b not in TORCHVISION_BASELINES]
    if unknown:
        raise ModelConfigError(
            f"Unknown baseline {unknown[0]!r}: choose from {', '.join(TORCHVISION_BASELINES)}."
        )
    bad_forms = [f for f in forms if f not in FORMS]
    if bad_forms:
        raise ModelConfigError(f"Unknown form {bad_forms[0]!r}: choose from {', '.join(FORMS)}.")
    result = []
    for name in names:
        spec = MODEL_SPECS[name]
        for form in forms:
            if form == "int8" and spec.use_se:
                continue  # INT8 quantization supports models without SE
            top1 = spec.paper_top1 if form != "int8" else None
            speed = spec.paper_speed if form == "deploy" else None
            result.append(Candidate(f"{name}:{form}", f"{name} ({form})", f"RepVGG {form}", top1, speed))
    for name in chosen_baselines:
        top1, speed = TORCHVISION_BASELINES[name]
        result.append(Candidate(f"torchvision:{name}", f"{name} (BN fused)", "torchvision", top1, speed))
    if timm_peers and _timm_available():
        for name in names:
            result.append(Candidate(f"timm:{name}", f"timm {name} (re-param)", "timm"))
    for path in checkpoints:  # before the minutes of measuring: a file that cannot be timed is said now
        require_kind(path, ("classifier", "segmenter", "int8", "onnx"), "timing", ModelConfigError)
        result.append(Candidate(f"file:{path}", Path(path).name, "checkpoint"))
    return result


def names(network: Any, name: str) -> bool:
    """Whether ``name`` names a measured network (a candidate or a row): its label, spec or last part of the
    spec (``resnet18`` for ``torchvision:resnet18``)."""
    return name in (network.label, network.spec, network.spec.split(":")[-1])


def _timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def build(spec: str) -> nn.Module:
    """The network a candidate spec names, in eval mode, with random weights."""
    source, _, name = spec.partition(":")
    if source == "figure3":
        kind, width, depth = name.split(":")
        return _ConvReLUStack(int(width), int(depth), residual=kind == "residual").eval()
    if source == "torchvision":
        import torchvision.models
        from torch.fx.experimental.optimization import fuse

        model = getattr(torchvision.models, name)(weights=None).eval()
        try:
            return fuse(model)  # conv-BN folded, as the paper did for its baselines
        except Exception:  # a network torch.fx cannot trace is measured unfused
            return model
    if source == "timm":
        import timm
        from timm.utils.model import reparameterize_model

        return reparameterize_model(timm.create_model(name, pretrained=False).eval())
    if source == "file":  # run the way `repvgg optimize` recorded in it, if it did
        return AsRecorded(load_checkpoint(name).eval())
    if name == "int8":
        generator = torch.Generator().manual_seed(0)
        calibration = [torch.randn(4, 3, 64, 64, generator=generator) for _ in range(2)]
        return quantize_ptq(create_model(source, deploy=True).eval(), calibration)
    model = create_model(source).eval()
    return reparameterize(model) if name == "deploy" else model


def counted_model(model: nn.Module) -> nn.Module:
    """The network whose MACs are counted: for an INT8 model or an ONNX file its float twin (the counter
    sees neither int8 ops nor onnxruntime's)."""
    if isinstance(model, AsRecorded):
        model = model.model
    return model.float_twin() if hasattr(model, "float_twin") else model


@dataclass(frozen=True)
class Protocol:
    """How networks are timed; stated in every report."""

    device: str
    batch_size: int
    image_size: int
    warmup: int
    batches: int
    rounds: int

    @property
    def timed_batches(self) -> int:
        return self.batches * self.rounds

    def describe(self) -> str:
        return (
            f"{self.device}, batch {self.batch_size}, float32, {self.image_size}x{self.image_size}, "
            f"{self.warmup} warm-up then {self.timed_batches} timed batches per network "
            f"({self.rounds} interleaved rounds of {self.batches})"
        )


def default_protocol(device: str, quick: bool = False) -> Protocol:
    """The paper's on CUDA (batch 128, 50 warm-up, 50 timed); smaller on the CPU, fewer with ``quick``."""
    if device == "cuda":
        return Protocol("cuda", 128, 224, 50, 10, 5) if not quick else Protocol("cuda", 64, 224, 5, 4, 3)
    return Protocol("cpu", 8, 224, 2, 2, 3) if not quick else Protocol("cpu", 4, 224, 1, 2, 3)


@dataclass
class Row:
    """The measurements of one network."""

    label: str
    spec: str
    family: str
    params: int
    gmacs: float  # multiply-accumulates of one example: the paper's "FLOPs" column counts these
    examples_per_s: float
    latency_ms: float
    spread: float
    peak_memory_mib: float | None
    paper_top1: float | None
    paper_speed: float | None
    speed_ratio: float | None = None  # to the chosen baseline


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def input_channels(model: nn.Module) -> int:
    """3 for every network but a checkpoint trained on grey images."""
    return model_info(model).in_chans


def example_batch(model: nn.Module, protocol: Protocol) -> torch.Tensor:
    size = protocol.image_size
    return torch.randn(protocol.batch_size, input_channels(model), size, size, device=protocol.device)


def peak_memory_mib(spec: str, protocol: Protocol) -> float | None:
    """Peak extra memory of one inference batch, beyond the weights and the input, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` around the forward pass. CPU: in a fresh process (so no
    other network's freed memory is reused), after one warm-up pass (which maps the library code and
    oneDNN's generated kernels), the kernel's resident-set high-water mark (VmHWM) is reset
    (``/proc/self/clear_refs``) and read after a second pass, minus the resident set just before it. The
    process runs with glibc's mmap threshold fixed at 64 KiB, so every tensor's memory goes back to the
    system when it is freed and the high-water mark follows the live tensors. None where neither is
    available.
    """
    if protocol.device == "cuda":
        with torch.inference_mode():
            model = build(spec).to("cuda")
            inputs = example_batch(model, protocol)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            model(inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        del model, inputs
        torch.cuda.empty_cache()
        return peak / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return None
    command = [
        sys.executable,
        "-c",
        "from repvgg.studies.bench import _measure_peak_in_this_process as m; m()",
        spec,
        str(protocol.batch_size),
        str(protocol.image_size),
    ]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    if result.returncode != 0:
        return None
    return float(result.stdout.strip().splitlines()[-1])


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _measure_peak_in_this_process() -> None:
    """The child of :func:`peak_memory_mib`: prints the peak extra MiB of one forward pass."""
    spec, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with torch.inference_mode():
        model = build(spec)
        inputs = torch.randn(batch, input_channels(model), size, size)
        model(inputs)  # warm-up: library pages and generated kernels are not activations
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current resident set
        before = _status_kib("VmRSS")
        model(inputs)
        peak = _status_kib("VmHWM")
    print((peak - before) / 1024)


@dataclass
class BenchResult:
    protocol: Protocol
    rows: list[Row]
    baseline: str | None
    machine: str
    torch_version: str
    extras: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": asdict(self.protocol),
            "protocol_text": self.protocol.describe(),
            "machine": self.machine,
            "torch": self.torch_version,
            "baseline": self.baseline,
            "rows": [asdict(row) for row in self.rows],
            **self.extras,
        }


def run_bench(
    chosen: Iterable[Candidate],
    protocol: Protocol,
    *,
    baseline: str | None = None,
    measure_memory: bool = True,
    progress: bool = True,
) -> BenchResult:
    """Build every candidate, count it, time them interleaved, measure peak memory; ratios to ``baseline``
    (a candidate's label or spec)."""
    chosen = list(chosen)
    # Built before the progress bar starts, so that a bad checkpoint is reported on a line of its own.
    models = {candidate.spec: build(candidate.spec).to(protocol.device) for candidate in chosen}
    steps = len(chosen) * (1 + protocol.rounds) + (len(chosen) if measure_memory else 0)
    bar = progress_bar(total=steps, desc="bench", unit="step", enabled=progress)
    with torch.inference_mode():
        inputs = {spec: example_batch(model, protocol) for spec, model in models.items()}
        measured = time_interleaved(
            models,
            inputs,
            warmup=protocol.warmup,
            rounds=protocol.rounds,
            batches_per_round=protocol.batches,
            on_progress=bar.update,
        )
    rows = []
    for candidate in chosen:
        # Counted on the built network at batch 1 (the meta device cannot build every torchvision model).
        counted = counted_model(models[candidate.spec])
        size = protocol.image_size
        macs = count_macs(counted, (1, input_channels(counted), size, size))
        timing = measured[candidate.spec]
        memory = None
        if measure_memory:
            memory = peak_memory_mib(candidate.spec, protocol)
            bar.update()
        rows.append(
            Row(
                label=candidate.label,
                spec=candidate.spec,
                family=candidate.family,
                params=count_parameters(counted),
                gmacs=macs / 1e9,
                examples_per_s=timing.images_per_s,
                latency_ms=timing.median_s * 1000,
                spread=timing.spread,
                peak_memory_mib=memory,
                paper_top1=candidate.paper_top1,
                paper_speed=candidate.paper_speed,
            )
        )
    bar.close()
    chosen_baseline = None
    if baseline is not None:
        reference = next((r for r in rows if names(r, baseline)), None)
        if reference is None:
            raise ModelConfigError(f"The baseline {baseline!r} is not among the measured networks.")
        chosen_baseline = reference.label
        for row in rows:
            row.speed_ratio = row.examples_per_s / reference.examples_per_s
    return BenchResult(
        protocol, rows, chosen_baseline, device_name(torch.device(protocol.device)), torch.__version__
    )


class _ConvReLUStack(nn.Module):
    """``depth`` blocks of two 3x3 conv + ReLU at one width; ``residual`` adds each block's input back.

    The two networks of the paper's Figure 3: same widths, depths and arithmetic; the residual one must
    keep every block's input alive until the addition.
    """

    def __init__(self, width: int, depth: int, residual: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.convs = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)])
            for _ in range(depth)
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(self.stem(x))
        for first, second in self.convs:
            identity = x if self.residual else None  # the plain block lets go of its input at once
            x = torch.relu_(first(x))
            x = second(x)
            if identity is not None:
                x += identity
            x = torch.relu_(x)
        return x


FIGURE3_SPECS = {"figure3:residual": True, "figure3:plain": False}


def memory_of_residual_vs_plain(protocol: Protocol, width: int = 64, depth: int = 8) -> dict[str, Any]:
    """Measured peak inference memory of a residual network and a plain one of the same shape."""
    peaks = {
        spec.split(":")[1]: peak_memory_mib(f"{spec}:{width}:{depth}", protocol) for spec in FIGURE3_SPECS
    }
    return {
        "width": width,
        "depth": depth,
        "batch": protocol.batch_size,
        "image_size": protocol.image_size,
        "device": protocol.device,
        "peak_memory_mib": peaks,
    }


def conv_density(protocol: Protocol, kernel_sizes: Sequence[int] = (1, 3, 5, 7)) -> list[dict[str, float]]:
    """Speed and TFLOP/s (2 floating-point operations per multiply-accumulate) of single convolutions by
    kernel size (the paper's Table 1).

    The paper's shape on CUDA (batch 32, 2048 -> 2048 channels, 56x56); a smaller one on the CPU
    (batch 1, 256 channels, 28x28), stated in the result.
    """
    if protocol.device == "cuda":
        batch, channels, size = 32, 2048, 56
    else:
        batch, channels, size = 1, 256, 28
    inputs = torch.randn(batch, channels, size, size, device=protocol.device)
    rows = []
    with torch.inference_mode():
        for k in kernel_sizes:
            conv = nn.Conv2d(channels, channels, k, padding=k // 2, bias=False).to(protocol.device).eval()
            for _ in range(2):
                conv(inputs)
            _synchronize(protocol.device)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                conv(inputs)
                _synchronize(protocol.device)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            flops = 2 * batch * size * size * channels * channels * k * k
            rows.append(
                {
                    "kernel": k,
                    "shape": f"batch {batch}, {channels}->{channels} channels, {size}x{size}",
                    "ms": seconds * 1000,
                    "tflops": flops / seconds / 1e12,
                    "examples_per_s": batch / seconds,
                }
            )
    return rows


def figure1(result: BenchResult, path: Path) -> Path:
    """Paper top-1 against measured examples/s: the paper's Figure 1, on this machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    families = {
        "RepVGG deploy": ("o", "tab:red", "RepVGG (deploy form)"),
        "torchvision": ("s", "tab:blue", "torchvision (BN fused)"),
    }
    for family, (marker, colour, legend) in families.items():
        points = [r for r in result.rows if r.family == family and r.paper_top1 is not None]
        if not points:
            continue
        speeds, accuracies = [r.examples_per_s for r in points], [r.paper_top1 for r in points]
        axes.scatter(speeds, accuracies, marker=marker, color=colour, label=legend)
        for r, x, y in zip(points, speeds, accuracies, strict=True):
            name = r.spec.split(":")[1] if family == "torchvision" else r.spec.split(":")[0]
            axes.annotate(
                name.removeprefix("repvgg_"), (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points"
            )
    axes.set_xlabel(f"measured examples/s ({result.protocol.describe()})", fontsize=8)
    axes.set_ylabel("ImageNet top-1 (%), as published")
    axes.set_title(f"Accuracy vs speed on {result.machine}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda target: figure.savefig(target, dpi=120, format="png"), what="the figure")
    plt.close(figure)
    return path


def figure3(memory: dict[str, Any], path: Path) -> Path:
    """Bars of measured peak inference memory: residual vs plain network of the same shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peaks = memory["peak_memory_mib"]
    figure, axes = plt.subplots(figsize=(5.5, 4.2))
    bars = axes.bar(list(peaks), [peaks[k] or 0 for k in peaks], color=["tab:blue", "tab:red"])
    axes.bar_label(bars, labels=[f"{peaks[k]:.1f} MiB" if peaks[k] is not None else "n/a" for k in peaks])
    axes.set_ylabel("peak extra memory of one batch (MiB)")
    shape = f"{memory['depth']} blocks of 2 conv3x3, width {memory['width']}"
    if "batch" in memory:  # bench.json files of earlier releases do not say
        size = memory["image_size"]
        shape += f"\nbatch {memory['batch']}, {size}x{size}, float32, {memory['device']}"
    axes.set_title(shape, fontsize=10)
    axes.margins(y=0.15)  # room for the labels above the bars
    figure.tight_layout()
    atomic_write(path, lambda target: figure.savefig(target, dpi=120, format="png"), what="the figure")
    plt.close(figure)
    return path


TABLE_HEADER = (
    "network",
    "params (M)",
    "GMACs",
    "examples/s",
    "ms/batch",
    "spread",
    "peak MiB",
    "paper top-1",
    "paper ex/s (1080Ti)",
    "ratio",
)


def table_rows(result: BenchResult) -> list[list[str]]:
    """The main table's cells (see :data:`TABLE_HEADER`), fastest network first."""
    return [
        [
            r.label,
            f"{r.params / 1e6:.2f}",
            f"{r.gmacs:.2f}",
            f"{r.examples_per_s:.1f}",
            f"{r.latency_ms:.0f}",
            f"{r.spread:.0%}",
            f"{r.peak_memory_mib:.0f}" if r.peak_memory_mib is not None else "-",
            f"{r.paper_top1:.2f}" if r.paper_top1 is not None else "-",
            f"{r.paper_speed:.0f}" if r.paper_speed is not None else "-",
            f"{r.speed_ratio:.2f}x" if r.speed_ratio is not None else "-",
        ]
        for r in sorted(result.rows, key=lambda r: -r.examples_per_s)
    ]


def print_table(result: BenchResult) -> None:
    """The main table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.machine}: {result.protocol.describe()}")
    for column in TABLE_HEADER:
        table.add_column(column, justify="left" if column == "network" else "right", no_wrap=True)
    for cells in table_rows(result):
        table.add_row(*cells)
    console = Console()
    # Piped to a file or a log, rich would squeeze the table into 80 columns and cut every name.
    Console(width=max(console.width, 150)).print(table)


def markdown_report(result: BenchResult) -> str:
    """The results as Markdown: the protocol, the main table, and the extras that were measured."""
    lines = [
        f"Machine: {result.machine}; torch {result.torch_version}.",
        f"Protocol: {result.protocol.describe()}.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|---|" + "---:|" * (len(TABLE_HEADER) - 1),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(result)]
    return "\n".join(lines + extras_report(result)) + "\n"


def extras_report(result: BenchResult) -> list[str]:
    """Markdown lines for the ratio's baseline, Table 1 (conv density) and Figure 3 (memory)."""
    lines: list[str] = []
    if result.baseline:
        lines += ["", f"Ratio: examples/s relative to {result.baseline}, measured in the same run."]
    density = result.extras.get("conv_density")
    if density:
        lines += [
            "",
            f"Convolution density ({density[0]['shape']}):",
            "",
            "| kernel | ms | TFLOP/s |",
            "|---|---:|---:|",
        ]
        lines += [f"| {d['kernel']}x{d['kernel']} | {d['ms']:.2f} | {d['tflops']:.3f} |" for d in density]
    memory = result.extras.get("residual_vs_plain")
    if memory:
        peaks = memory["peak_memory_mib"]
        lines += [
            "",
            f"Peak inference memory, {memory['depth']} blocks of two 3x3 convs at width {memory['width']}: "
            + ", ".join(f"{k} {v:.0f} MiB" if v is not None else f"{k} -" for k, v in peaks.items()),
        ]
    return lines


def write_reports(result: BenchResult, output: Path, *, figures: bool = True) -> list[Path]:
    """``bench.json``, ``bench.md`` and, with ``figures``, ``figure1.png`` and ``figure3.png``."""
    output.mkdir(parents=True, exist_ok=True)
    written = [output / "bench.json", output / "bench.md"]
    write_json(written[0], result.to_json(), what="the bench results", error_type=ModelConfigError)
    text = markdown_report(result)
    atomic_write(written[1], lambda target: target.write_text(text), what="the bench table")
    if figures:
        written.append(figure1(result, output / "figure1.png"))
        if result.extras.get("residual_vs_plain"):
            written.append(figure3(result.extras["residual_vs_plain"], output / "figure3.png"))
    return written
