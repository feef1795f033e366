"""The GPU evidence, in one unattended run that writes everything it measures under ``--output``.

1. The paper's speed protocol (batch 128, 224 px, fp32, 50 warm-up + 50 timed batches, cuDNN benchmark mode):
   every RepVGG in both forms, torchvision's ResNet-18/34/50/101/152 and timm's re-parameterized RepVGG, timed
   interleaved; then every deployed form in fp32, fp16 and bf16 (channels_last), interleaved per model.
2. Training throughput with AMP (bf16, fp16): ours (the paper's block, the online block and RepOpt) beside
   timm's repvgg_a0 and repvgg_b0, batch 256, 224 px, and repvgg_a0 at 28 px, with peak memory.
3. Conversion exactness on the GPU in float64 for every model, and a one-process DDP (nccl) training run
   through ``torchrun``.
4. If the time budget allows and Fashion-MNIST is given: Table 6 at a longer schedule (A0, the four branch
   variants, 2 seeds, 10 epochs).

    bash benchmarks/gpu_suite.sh --output runs/gpu-suite --fashion-dir /usr/share/datasets/fashion-mnist
    python benchmarks/gpu_suite.py --smoke --output /tmp/gpu-suite      # tiny sizes on the CPU (the tests)

At most eight files are written to ``--output`` (suite.json, suite.md, bench.json, bench.md, figure1.png,
table6.md, log.txt), so that they all come back from a lent GPU machine; the runs' folders go to ``--work``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
TABLE6 = ["repvgg", "no_identity", "no_1x1", "plain"]


class Suite:
    """The sections run in order against one time budget; each records its figures or why it was skipped."""

    def __init__(self, output: Path, work: Path, budget_s: float, smoke: bool) -> None:
        self.output, self.work, self.smoke = output, work, smoke
        self.deadline = time.monotonic() + budget_s
        self.device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
        self.record: dict[str, Any] = {
            "smoke": smoke,
            "environment": environment(self.device),
            "sections": {},
        }
        self.log = (output / "log.txt").open("a")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def section(self, name: str, run: Callable[[], dict[str, Any]], needs_s: float = 0.0) -> None:
        """Run one section; a failure is recorded (with its message) and the suite goes on."""
        if self.left() < needs_s:
            self.record["sections"][name] = {"status": "skipped", "why": f"{self.left():.0f} s left"}
            self.say(f"== {name}: skipped ({self.left():.0f} s left, needs {needs_s:.0f})")
            return
        self.say(f"== {name} ({self.left():.0f} s left)")
        start = time.monotonic()
        try:
            figures = run()
            result = {"status": "ok", **figures}
        except Exception as error:  # one section's failure must not lose the others' figures
            result = {"status": "failed", "why": f"{type(error).__name__}: {error}"}
        result["seconds"] = round(time.monotonic() - start, 1)
        self.record["sections"][name] = result
        self.say(
            f"   {result['status']} in {result['seconds']} s"
            + (f": {result['why']}" if "why" in result else "")
        )
        self.save()

    def save(self) -> None:
        (self.output / "suite.json").write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        (self.output / "suite.md").write_text(markdown(self.record))


def environment(device: torch.device) -> dict[str, Any]:
    from repvgg.engine.environment import environment as run_environment

    found = run_environment(device)
    found["cudnn"] = torch.backends.cudnn.version() if device.type == "cuda" else None
    if device.type == "cuda":
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            found["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found["nvidia_smi"] = None
    return found


# -- 1. speed -------------------------------------------------------------------------------------------


def speed(suite: Suite) -> dict[str, Any]:
    from repvgg.studies.bench import Protocol, candidates, default_protocol, run_bench, write_reports

    torch.backends.cudnn.benchmark = True
    if suite.smoke:
        protocol = Protocol("cpu", 2, 32, 1, 1, 1)
        chosen = candidates(["repvgg_a0"], baselines=["resnet18"], timm_peers=False)
    else:
        protocol = default_protocol("cuda")
        chosen = candidates(None, baselines=RESNETS, timm_peers=True)
    result = run_bench(chosen, protocol, baseline="resnet18", measure_memory=not suite.smoke, progress=False)
    write_reports(result, suite.output, figures=True)
    rows = {row.spec: row for row in result.rows}
    models = sorted({spec.split(":")[0] for spec in rows if spec.endswith(":deploy")})
    ratios = {
        name: rows[f"{name}:deploy"].examples_per_s / rows[f"{name}:train"].examples_per_s
        for name in models
        if f"{name}:train" in rows
    }
    return {
        "protocol": protocol.describe(),
        "rows": [vars(row) for row in result.rows],
        "deploy_over_train": ratios,
        "half_precision": half_precision(suite, models, protocol),
    }


def half_precision(suite: Suite, models: list[str], protocol: Any) -> dict[str, dict[str, float]]:
    """Images/s of each deployed model in fp32, fp16 and bf16 (channels_last), interleaved per model."""
    from repvgg import create_model
    from repvgg.runtime.measure import time_interleaved

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if suite.device.type == "cpu":
        dtypes.pop("fp16")  # CPU half-precision convolutions are not what this section is about
    figures = {}
    for name in models:
        runs, inputs = {}, {}
        for label, dtype in dtypes.items():
            model = create_model(name, deploy=True).eval()
            runs[label] = model.to(suite.device, dtype, memory_format=torch.channels_last)
            inputs[label] = torch.randn(
                protocol.batch_size,
                3,
                protocol.image_size,
                protocol.image_size,
                device=suite.device,
                dtype=dtype,
            ).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            measured = time_interleaved(
                runs,
                inputs,
                warmup=protocol.warmup,
                rounds=protocol.rounds,
                batches_per_round=protocol.batches,
            )
        figures[name] = {label: throughput.images_per_s for label, throughput in measured.items()}
        suite.say(f"   {name}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in figures[name].items()))
    return figures


# -- 2. training with AMP -------------------------------------------------------------------------------


def training(suite: Suite) -> dict[str, Any]:
    batch, steps = (4, 2) if suite.smoke else (256, 20)
    amps = ["bf16"] if suite.device.type == "cpu" else ["bf16", "fp16"]
    # (model, image size): the 28 px row is issue 27's small-image target (>= 1.5x timm)
    shapes = (
        [("repvgg_a0", 32)] if suite.smoke else [("repvgg_a0", 224), ("repvgg_b0", 224), ("repvgg_a0", 28)]
    )
    implementations = [*OUR_DESIGNS, "timm"] if timm_available() else list(OUR_DESIGNS)
    rows = []
    for name, size in shapes:
        for amp in amps:
            measured: dict[str, list[dict[str, float]]] = {impl: [] for impl in implementations}
            for _ in range(1 if suite.smoke else 2):  # alternate, so that drift hits both alike
                for impl in implementations:
                    measured[impl].append(train_steps(impl, name, amp, batch, size, steps, suite.device))
                    if suite.device.type == "cuda":
                        torch.cuda.empty_cache()  # the last model's memory, before the next one's peak
            for impl, runs in measured.items():
                row = {
                    "model": name,
                    "implementation": impl,
                    "amp": amp,
                    "batch": batch,
                    "image_size": size,
                    "images_per_s": statistics.median(r["images_per_s"] for r in runs),
                    "peak_memory_mib": max(r["peak_memory_mib"] for r in runs),
                }
                rows.append(row)
                speed, peak = row["images_per_s"], row["peak_memory_mib"]
                suite.say(f"   {name} {size} px {impl} {amp}: {speed:.0f} img/s, {peak:.0f} MiB")
    return {"rows": rows, "ours_over_timm": ratios_to_timm(rows)}


#: Our implementations timed in training: the paper's block, online re-parameterization, RepOpt.
OUR_DESIGNS = {"ours": "repvgg", "online": "online", "repopt": "repopt"}


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def train_steps(
    implementation: str, name: str, amp: str, batch: int, size: int, steps: int, device: torch.device
) -> dict[str, float]:
    """SGD steps of one implementation with autocast (and a GradScaler for fp16): images/s, peak MiB."""
    torch.manual_seed(0)
    multipliers = []
    if implementation in OUR_DESIGNS:
        from repvgg import create_model
        from repvgg.engine.recipe import repopt_multipliers

        model = create_model(name, num_classes=1000, block=OUR_DESIGNS[implementation])
        multipliers = repopt_multipliers(model, initialize=True)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=1000)
    model = model.to(device, memory_format=torch.channels_last).train()
    multipliers = [(parameter, multiplier.to(device)) for parameter, multiplier in multipliers]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for parameter, multiplier in multipliers:  # RepOpt: what `repvgg train --block repopt` does
            parameter.grad.mul_(multiplier)
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3 if device.type == "cuda" else 1):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"images_per_s": batch * steps / seconds, "peak_memory_mib": peak}


def ratios_to_timm(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput over timm's for each of our designs (``ours`` is the paper's block), model and precision."""
    by_key = {(r["model"], r["image_size"], r["amp"], r["implementation"]): r for r in rows}
    return {
        f"{model} {size} px {amp}" + ("" if impl == "ours" else f" {impl}"): by_key[(model, size, amp, impl)][
            "images_per_s"
        ]
        / by_key[(model, size, amp, "timm")]["images_per_s"]
        for (model, size, amp, impl) in by_key
        if impl in OUR_DESIGNS and (model, size, amp, "timm") in by_key
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 3. exactness on the device and DDP ----------------------------------------------------------------


def exactness(suite: Suite) -> dict[str, Any]:
    from repvgg import MODEL_SPECS, create_model, randomize_batchnorm_, verify_equivalence

    names = ["repvgg_a0"] if suite.smoke else list(MODEL_SPECS)
    errors = {}
    for name in names:
        model = create_model(name).to(suite.device, torch.float64)
        randomize_batchnorm_(model)
        report = verify_equivalence(model, input_shape=(2, 3, 64, 48) if suite.smoke else (2, 3, 224, 160))
        errors[name] = report.max_rel_error
        if not report.passed:
            raise AssertionError(
                f"{name} converts with relative error {report.max_rel_error:.2e} on {suite.device}"
            )
    return {"max_rel_error": errors, "device": str(suite.device)}


def ddp(suite: Suite) -> dict[str, Any]:
    """One process under torchrun: the distributed code path with nccl (gloo on the CPU) end to end."""
    data = write_random_fashion(suite.work / "random-fashion", train=512, test=128)
    output = suite.work / "ddp-run"
    size = ["--train-subset", "64", "--val-subset", "32", "--batch-size", "32"] if suite.smoke else []
    size = size or ["--batch-size", "64"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "repvgg", "train", "--data-dir", str(data), "--epochs", "1",
        "--output", str(output), "--overwrite", "--no-progress", "--log-interval", "0",
        "--device", suite.device.type, *size,
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=child_environment())
    if finished.returncode != 0:
        raise RuntimeError(f"torchrun exited with {finished.returncode}: {finished.stderr.strip()[-500:]}")
    summary = json.loads((output / "summary.json").read_text())
    return {
        "processes": summary["processes"],
        "backend": "nccl" if suite.device.type == "cuda" else "gloo",
        "forms_agree": summary["forms_agree"],
        "train_images_per_s": summary["train_form"]["images_per_s"],
    }


def child_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), environment.get("PYTHONPATH")])
    )
    return environment


def write_random_fashion(folder: Path, *, train: int, test: int) -> Path:
    """Fashion-MNIST-shaped idx files of random pixels and labels: the data of a code-path check."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", train), ("t10k", test)):
        pixels = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.randint(0, 10, (count,), generator=generator, dtype=torch.uint8)
        images_header = (2051).to_bytes(4, "big") + count.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        labels_header = (2049).to_bytes(4, "big") + count.to_bytes(4, "big")
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as file:
            file.write(images_header + pixels.numpy().tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as file:
            file.write(labels_header + labels.numpy().tobytes())
    return folder


# -- 4. Table 6, longer ------------------------------------------------------------------------------------


def table6(suite: Suite, fashion: Path | None) -> dict[str, Any]:
    if suite.smoke:
        fashion = write_random_fashion(suite.work / "random-fashion", train=512, test=128)
        options = ["--variants", "repvgg", "plain", "--seeds", "1", "--epochs", "1", "--train-subset", "64"]
        options += ["--val-subset", "32", "--batch-size", "32", "--speed-batch", "2"]
    else:
        if fashion is None:
            raise FileNotFoundError("no Fashion-MNIST folder was given (--fashion-dir)")
        options = ["--variants", *TABLE6, "--seeds", "2", "--epochs", "10", "--batch-size", "256"]
    study = suite.work / "table6"
    command = [
        sys.executable, "-m", "repvgg", "ablate", "--model", "repvgg_a0", "--data-dir", str(fashion),
        *options, "--device", suite.device.type, "--output", str(study), "--no-progress",
        "--log-interval", "0",
    ]  # fmt: skip
    timeout = max(30.0, suite.left() - 20)
    try:
        finished = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=child_environment()
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(
            f"the study did not finish in {timeout:.0f} s; its finished runs stay in {study}"
        ) from None
    if finished.returncode != 0:
        raise RuntimeError(
            f"repvgg ablate exited with {finished.returncode}: {finished.stderr.strip()[-500:]}"
        )
    shutil.copyfile(study / "ablation.md", suite.output / "table6.md")
    report = json.loads((study / "ablation.json").read_text())
    return {
        "command": " ".join(command[1:]),
        "rows": {
            row["variant"]: {"mean": row["train_top1_mean"], "std": row["train_top1_std"]}
            for row in report["rows"]
        },
    }


# -- the report ---------------------------------------------------------------------------------------------


def markdown(record: dict[str, Any]) -> str:
    environment = record["environment"]
    lines = [
        "# GPU suite"
        + (" (smoke run on the CPU: sizes too small to mean anything)" if record["smoke"] else ""),
        "",
        f"Device: {environment.get('device')}; nvidia-smi: {environment.get('nvidia_smi')}; torch "
        f"{environment.get('torch')}, CUDA {environment.get('cuda')}, cuDNN {environment.get('cudnn')}; "
        f"command: {' '.join(environment.get('command', []))}",
        "",
    ]
    for name, section in record["sections"].items():
        lines.append(f"## {name}: {section['status']} ({section.get('seconds', 0)} s)")
        if "why" in section:
            lines.append(f"\n{section['why']}\n")
            continue
        if name == "speed":
            lines += ["", f"Protocol: {section['protocol']}. Full table: bench.md.", ""]
            lines += [
                "| model | deploy / train | fp32 img/s | fp16 img/s | bf16 img/s |",
                "|---|---:|---:|---:|---:|",
            ]
            for model, ratio in section["deploy_over_train"].items():
                half = section["half_precision"].get(model, {})
                cells = [f"{half[k]:.0f}" if k in half else "-" for k in ("fp32", "fp16", "bf16")]
                lines.append(f"| {model} | {ratio:.2f}x | " + " | ".join(cells) + " |")
        elif name == "training":
            lines += [
                "",
                "| model | image size | implementation | AMP | batch | img/s | peak MiB |",
                "|---|---:|---|---|---:|---:|---:|",
            ]
            for row in section["rows"]:
                lines.append(
                    f"| {row['model']} | {row['image_size']} | {row['implementation']} | {row['amp']} | "
                    f"{row['batch']} | "
                    f"{row['images_per_s']:.0f} | {row['peak_memory_mib']:.0f} |"
                )
            lines += [""] + [
                f"- ours / timm, {key}: {value:.2f}x" for key, value in section["ours_over_timm"].items()
            ]
        elif name == "exactness":
            worst = max(section["max_rel_error"].values())
            count = len(section["max_rel_error"])
            lines.append(
                f"\nfloat64 on {section['device']}: worst relative error {worst:.1e} over {count} models"
            )
        elif name == "ddp":
            processes, backend = section["processes"], section["backend"]
            lines.append(f"\n{processes} process ({backend}): forms agree {section['forms_agree']}")
        elif name == "table6":
            lines += ["", f"`{section['command']}`; table: table6.md", ""]
            lines += [
                f"- {variant}: {row['mean']:.2f}"
                + (f" +- {row['std']:.2f}" if row["std"] is not None else "")
                for variant, row in section["rows"].items()
            ]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="The GPU evidence suite (see the module's docstring).")
    parser.add_argument("--output", type=Path, default=Path("runs/gpu-suite"), help="where the reports go")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder for runs (default: OUTPUT/../work)"
    )
    parser.add_argument("--fashion-dir", type=Path, default=None, help="Fashion-MNIST idx files, for Table 6")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole suite")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to test the script")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    work = args.work or args.output.parent / f"{args.output.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.output, work, args.budget, args.smoke)
    if suite.device.type != "cuda" and not args.smoke:
        suite.say("no CUDA GPU is usable here: run with --smoke to test the script on the CPU")
        return 2
    suite.say(f"GPU suite on {suite.record['environment']['device']}, budget {args.budget:.0f} s")
    suite.section("exactness", lambda: exactness(suite))
    suite.section("speed", lambda: speed(suite))
    suite.section("training", lambda: training(suite))
    suite.section("ddp", lambda: ddp(suite))
    suite.section("table6", lambda: table6(suite, args.fashion_dir), needs_s=0 if args.smoke else 150)
    suite.save()
    failed = [name for name, section in suite.record["sections"].items() if section["status"] == "failed"]
    suite.say(
        f"wrote {args.output}/suite.md and suite.json" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
