"""The ``repvgg`` command line. Heavy imports (torch) happen inside the commands, not at start-up."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from repvgg.engine.config import (
    AMP_CHOICES,
    DATASETS,
    RANGES,
    SEG_DATASETS,
    RunConfig,
    SegTrainConfig,
    TrainConfig,
)
from repvgg.runtime.names import (
    BACKEND_CHOICES,
    DEVICE_PATTERN,
    EXPORT_TARGETS,
    OUTPUT_FORMATS,
    PRECISION_CHOICES,
)


def _number(
    kind: type[int] | type[float], low: float | None = None, high: float | None = None, *, above: bool = False
) -> Callable[[str], Any]:
    """An argparse ``type``: a finite ``kind`` from ``low`` (or above it, with ``above``) to ``high``."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {what}; give {_bounds(low, high, above)}."
            ) from None
        if (
            not math.isfinite(value)
            or (low is not None and (value <= low if above else value < low))
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high, above)}, got {text}.")
        return value

    parse.__name__ = f"{kind.__name__}_in_range"
    return parse


def _bounds(low: float | None, high: float | None, above: bool) -> str:
    text = "a finite number" if low is None else f"{'above' if above else 'at least'} {low}"
    return text + (f" and at most {high}" if high is not None else "")


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0, above=True)
image_size = _number(int, *RANGES["image_size"])  # the ranges of train's options, for every command
workers = _number(int, *RANGES["workers"])
seed = _number(int, *RANGES["seed"])


def device(text: str) -> str:
    """An argparse ``type``: cpu, cuda or cuda:N."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}.")
    return text


def _models_table(args: argparse.Namespace) -> int:
    import torch

    from repvgg.core.registry import MODEL_SPECS, create_model
    from repvgg.runtime.measure import count_macs, count_parameters

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
    console = Console(width=max(console.width, 120))  # piped, rich would cut names to fit 80 columns
    console.print(table)
    console.print(f"Paper top-1 (ImageNet) from: {sources}.")
    return 0


def _run_config(args: argparse.Namespace, kind: type[RunConfig]) -> tuple[Any, bool]:
    """A run's configuration (``train``, ``train-seg``): defaults, then the saved run (``--resume``) or the
    ``--config`` file, then the flags given. One rule for both: resuming takes the run's own settings."""
    from repvgg.engine.config import load_run_config
    from repvgg.exceptions import TrainingError

    given = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config", "resume")}
    if args.config and args.resume:
        raise TrainingError(
            "`resume` continues with the run's own config.json; drop `config` (or start a new run with it)."
        )
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_run_config(args.config))
    values.update(given)
    if "output" not in values:
        values["output"] = kind.default_output(values)
    if args.resume:
        saved = Path(values["output"]) / "config.json"
        values = {**load_run_config(saved, saved_run=True), **given} if saved.is_file() else values
    return kind.from_dict(values), bool(args.resume)


def _train(args: argparse.Namespace) -> int:
    from repvgg.engine.training import train
    from repvgg.studies.ablation import build_network

    config, resume = _run_config(args, TrainConfig)
    summary = train(config, resume=resume, build_network=build_network)  # the residual baseline too
    _print_summary(summary, config.output)
    return 0


def _print_summary(summary: dict[str, Any], output: str) -> None:
    train_form, deploy_form = summary["train_form"], summary["deploy_form"]
    print(
        f"training form: top-1 {train_form['top1']:.2f}%, top-5 {train_form['top5']:.2f}%, "
        f"{train_form['images_per_s']:.0f} img/s"
    )
    if deploy_form is None:
        print("this design has no plain (deploy) form, so it was not converted")
        print(f"saved {output}/model_train.safetensors")
        return
    print(
        f"deploy form:   top-1 {deploy_form['top1']:.2f}%, top-5 {deploy_form['top5']:.2f}%, "
        f"{deploy_form['images_per_s']:.0f} img/s"
    )
    verdict = "agree" if summary["forms_agree"] else "DISAGREE"
    print(f"the two forms {verdict} (top-1 difference {summary['top1_difference']:.4f} points)")
    print(f"saved {output}/model_train.safetensors and {output}/model_deploy.safetensors")


def _note_guesses(checkpoint: str) -> None:
    """Say what a checkpoint without this package's model record makes the command assume."""
    from repvgg.io.checkpoints import source_note

    note = source_note(checkpoint)
    if note is not None:
        print(f"note: {checkpoint}: {note}")


def _eval(args: argparse.Namespace) -> int:
    from repvgg.engine.evaluation import evaluate_checkpoint
    from repvgg.io.checkpoints import is_segmenter

    if is_segmenter(args.checkpoint) or args.data in SEG_DATASETS:  # a classifier there is refused
        return _eval_segmenter(args)
    data = args.data or "fashion-mnist"
    _note_guesses(args.checkpoint)
    result = evaluate_checkpoint(
        args.checkpoint,
        data=data,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        val_subset=args.val_subset,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        backend=args.backend,
        image_size=args.image_size,
        results_file=args.results_file,
        progress=args.progress,
    )
    for note in result.notes:
        print(f"note: {note}")
    per_class = result.per_class_top1()
    if per_class and len(per_class) <= 30:  # a longer list belongs in the results file
        names = result.class_names or tuple(str(i) for i in range(len(per_class)))
        shown = [f"{n} {'-' if v is None else f'{v:.1f}'}" for n, v in zip(names, per_class, strict=False)]
        print(f"top-1 per class: {', '.join(shown)}")
    print(
        f"{args.checkpoint}: top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}%, loss {result.loss:.4f} "
        f"on {result.images} {data} validation images, {result.images_per_s:.0f} img/s"
    )
    return 0


def _eval_segmenter(args: argparse.Namespace) -> int:
    """``eval`` of a PSPNet checkpoint: mIoU, pixel accuracy and each class's IoU."""
    from repvgg.exceptions import InferenceError
    from repvgg.studies.segmentation import evaluate_segmentation_checkpoint

    if args.backend is not None or args.amp != "none":
        raise InferenceError(
            f"{args.checkpoint} is a PSPNet, evaluated in PyTorch in float32: drop `backend` and `amp`."
        )
    data = args.data or "fashion-mnist-seg"
    result = evaluate_segmentation_checkpoint(
        args.checkpoint,
        data=data,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        val_subset=args.val_subset,
        image_size=args.image_size,
        device=args.device,
        workers=args.workers or 0,
        results_file=args.results_file,
        progress=args.progress,
    )
    ious = zip(result["class_names"], result["class_iou"], strict=True)
    print("IoU per class: " + ", ".join(f"{n} {'-' if v is None else f'{v:.1f}'}" for n, v in ious))
    print(
        f"{args.checkpoint}: mIoU {result['miou']:.2f}%, pixel accuracy {result['pixel_accuracy']:.2f}% on "
        f"{result['images']} {data} validation images, {result['images_per_s']:.0f} img/s"
    )
    if args.results_file:
        print(f"wrote {args.results_file}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from repvgg.runtime.convert import convert_checkpoint

    _note_guesses(args.checkpoint)
    result = convert_checkpoint(args.checkpoint, args.output, to=args.format)
    print(f"conversion check in float64: {result.report}")
    print(f"wrote the deploy-form checkpoint {result.path} ({result.output_format} format)")
    if result.note:
        print(f"note: {result.note}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from repvgg.runtime.convert import verify_checkpoints

    report = verify_checkpoints(args.checkpoint, args.deploy_checkpoint)
    against = args.deploy_checkpoint or "its own conversion"
    print(f"{args.checkpoint} vs {against}: {report}")
    return 0 if report.passed else 1


def _export(args: argparse.Namespace) -> int:
    from repvgg.core.info import model_info
    from repvgg.exceptions import ExportError
    from repvgg.io.checkpoints import load_checkpoint, require_kind
    from repvgg.io.files import refuse_same_file, writable_or_raise
    from repvgg.runtime.convert import CONVERTIBLE
    from repvgg.runtime.export import export_model, export_target

    writable_or_raise(args.output, ExportError)
    refuse_same_file(args.checkpoint, args.output, ExportError)
    to = export_target(args.output, args.to)  # a name that does not fit the format: before any work
    require_kind(args.checkpoint, CONVERTIBLE, "export", ExportError)
    _note_guesses(args.checkpoint)
    model = load_checkpoint(args.checkpoint)
    if model_info(model).form == "train":
        print(f"note: {args.checkpoint} is in training form; converting it before the export")
    shape = (args.batch_size, model.in_chans, args.image_size, args.image_size) if args.image_size else None
    print(export_model(model, args.output, to=to, input_shape=shape))
    return 0


def _say_backend(runner: Any) -> None:
    """Which backend ``--backend auto`` chose (or the checkpoint's record named), and the timings it chose
    by; to stderr, since stdout is results. Plain eager float32, the default, goes unsaid."""
    if (runner.backend, runner.precision) == ("eager", "fp32") and not runner.timings:
        return
    message = f"note: backend {runner.backend}" + (
        f" in {runner.precision}" if runner.precision != "fp32" else ""
    )
    if runner.timings:
        message += (
            " (per batch: " + ", ".join(f"{n} {s * 1000:.1f} ms" for n, s in runner.timings.items()) + ")"
        )
    if runner.skipped:
        message += "; " + "; ".join(f"{name} not used: {why}" for name, why in runner.skipped.items())
    print(message, file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
    from repvgg.io.checkpoints import is_segmenter
    from repvgg.io.images import image_files
    from repvgg.runtime.predict import check_predictions_file, predict, write_predictions

    if is_segmenter(args.checkpoint):
        return _segment(args)
    _note_guesses(args.checkpoint)
    if args.output is not None:  # before the work: a wrong name or place is said at once
        check_predictions_file(args.output)
    predictions, bad = predict(
        args.checkpoint,
        image_files(args.images),
        topk=args.topk,
        batch_size=args.batch_size,
        backend=args.backend,
        preprocessing=args.preprocessing,
        image_size=args.image_size,
        device=args.device,
        workers=args.workers,
        progress=args.progress,
        on_backend=_say_backend if args.backend in ("auto", None) else None,
    )
    for prediction in predictions:
        labels = ", ".join(f"{label} {probability:.1%}" for label, probability in prediction.top)
        print(f"{prediction.path}: {labels}")
    for image in bad:
        print(f"repvgg predict: error: {image.error('it was skipped')}", file=sys.stderr)
    if args.output is not None:
        print(f"wrote {write_predictions(predictions, args.output)}")
    return 1 if bad else 0


def _segment(args: argparse.Namespace) -> int:
    """``predict`` with a PSPNet checkpoint: a mask PNG per image in --output, each class's share printed."""
    from repvgg.exceptions import InferenceError
    from repvgg.io.checkpoints import require_kind
    from repvgg.io.images import image_files
    from repvgg.runtime.predict import segment

    require_kind(args.checkpoint, ("segmenter",), "segmentation", InferenceError)
    if args.output is None or Path(args.output).suffix in (".csv", ".json"):
        raise InferenceError(
            f"{args.checkpoint} is a PSPNet: its predictions are masks, written as PNGs into a folder; give "
            "that folder as `output`."
        )
    if args.backend not in (None, "eager") or args.preprocessing is not None:
        raise InferenceError(
            f"{args.checkpoint} is a PSPNet, run eagerly: drop `backend` and `preprocessing`."
        )
    masks, bad = segment(
        args.checkpoint,
        image_files(args.images),
        args.output,
        image_size=args.image_size,
        device=args.device,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    for result in masks:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in result.shares[: args.topk])
        print(f"{result.path}: {shares} -> {result.mask}")
    for image in bad:
        print(f"repvgg predict: error: {image.error('it was skipped')}", file=sys.stderr)
    return 1 if bad else 0


def _quantize(args: argparse.Namespace) -> int:
    from repvgg.studies.quantization import quantize_checkpoint

    quantized, notes = quantize_checkpoint(
        args.checkpoint,
        args.output,
        data=args.data,
        data_dir=args.data_dir,
        calib=args.calib,
        qat_epochs=args.qat_epochs,
        qat_lr=args.qat_lr,
        qat_subset=args.qat_subset,
        batch_size=args.batch_size,
        weights=args.weights,
        seed=args.seed,
        image_size=args.image_size,
        device=args.device,
        workers=args.workers,
        progress=args.progress,
        log_interval=args.log_interval,
    )
    for note in notes:
        print(f"note: {note}")
    epochs = f"{args.qat_epochs} QAT epoch{'s' if args.qat_epochs != 1 else ''}"
    how = epochs if args.qat_epochs else f"{args.calib} calibration images"
    bits = quantized.activation_bits
    full = ", the full range this CPU's VNNI allows" if bits == 8 else ""
    print(
        f"wrote the INT8 model {args.output} (x86 engine, {how}, {args.weights} weights, {bits}-bit "
        f"activations{full}); "
        "evaluate it with repvgg eval"
    )
    return 0


def _shard(args: argparse.Namespace) -> int:
    from repvgg.io.shards import write_shards
    from repvgg.runtime.progress import progress_bar

    bar = progress_bar(desc="shard", unit="img", enabled=args.progress)

    def step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = write_shards(
            args.source,
            args.output,
            shard_size=args.shard_size,
            seed=args.seed,
            overwrite=args.overwrite,
            on_step=step,
        )
    finally:
        bar.close()
    for split, figures in summary.items():
        print(
            f"{args.output}/{split}: {figures['samples']:,} images in {figures['shards']} shard(s), "
            f"{figures['bytes'] / 1e6:.1f} MB"
        )
    print(f"train from them with: repvgg train --data shards --data-dir {args.output}")
    return 0


def _optimize(args: argparse.Namespace) -> int:
    from repvgg.runtime.progress import StepProgress
    from repvgg.studies.optimization import optimize_checkpoint, winner_paths

    print(f"the winner will be written to {' or '.join(map(str, winner_paths(args.output, args.backend)))}")
    steps = StepProgress("optimize", enabled=args.progress)
    try:
        result = optimize_checkpoint(
            args.checkpoint,
            args.output,
            data=args.data,
            data_dir=args.data_dir,
            precision=args.precision,
            backend=args.backend,
            max_top1_drop=args.max_drop,
            calib=args.calib,
            val_subset=args.val_subset,
            batch_size=args.batch_size,
            image_size=args.image_size,
            device=args.device,
            workers=args.workers,
            repeats=args.repeats,
            overwrite=args.overwrite,
            on_step=steps,
        )
    finally:
        steps.close()
    fp32 = next((r for r in result.report if r.precision == "fp32" and r.images_per_s), None)
    print("backend      precision  images/s   vs fp32   top-1    drop  agreement  chosen, or why not")
    for row in result.report:
        ratio = (
            row.images_per_s / fp32.images_per_s if row.images_per_s and fp32 and fp32.images_per_s else None
        )
        cells = [
            _cell(row.images_per_s, "9.0f"),
            _cell(ratio, "8.2f", "x"),
            _cell(row.top1, "7.2f"),
            _cell(row.top1_drop, "+7.2f"),
            _cell(row.agreement, "9.2f", "%"),
        ]
        print(f"{row.backend:12s} {row.precision:9s} {' '.join(cells)}  {row.why_not or 'CHOSEN'}")
    if fp32 is not None:
        print(f"(vs fp32: images/s relative to {fp32.backend} in fp32)")
    print(
        f"chose {result.backend} in {result.precision} (top-1 judged on {result.images} held-out images, "
        f"guard {args.max_drop:g} points); wrote {result.path}, which eval and predict run that way"
    )
    return 0


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    """A right-aligned table cell: ``value`` in ``spec`` with ``unit``, or a dash of the same width."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit())) + len(unit)
    return f"{value:{spec}}{unit}" if value is not None else "-".rjust(width)


def _train_seg(args: argparse.Namespace) -> int:
    from repvgg.studies.segmentation import train_segmentation

    config, resume = _run_config(args, SegTrainConfig)
    summary = train_segmentation(config, resume=resume)
    speed = summary["speed"]
    for form in ("train_form", "deploy_form"):
        result = summary[form]
        print(
            f"{form.replace('_', ' ')}: mIoU {result['miou']:.2f}%, pixel accuracy "
            f"{result['pixel_accuracy']:.2f}%, {speed[f'{form}_images_per_s']:.0f} img/s "
            f"(batch {speed['batch']})"
        )
    per_class = zip(summary["class_names"], summary["deploy_form"]["class_iou"], strict=True)
    print(
        "IoU per class: " + ", ".join(f"{n} {'-' if iou is None else f'{iou:.1f}'}" for n, iou in per_class)
    )
    print(
        f"mIoU identical after conversion: {summary['miou_identical']} "
        f"({summary['changed_pixels']} pixels labelled differently); saved in {config.output}"
    )
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from repvgg.studies.ablation import AblationConfig, run_ablation

    report = run_ablation(AblationConfig(**_options(args)))
    from repvgg.studies.ablation import markdown_table

    print(markdown_table(report), end="")
    print(f"wrote {args.output}/ablation.md and {args.output}/ablation.json")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from repvgg.exceptions import ModelConfigError
    from repvgg.io.files import output_folder
    from repvgg.runtime.device import resolve_device
    from repvgg.studies.bench import (
        candidates,
        conv_density,
        default_protocol,
        extras_report,
        memory_of_residual_vs_plain,
        names,
        print_table,
        run_bench,
        write_reports,
    )

    device = resolve_device(args.device, ModelConfigError).type
    output_folder(args.output, ModelConfigError)  # before the minutes of measuring
    protocol = default_protocol(device, quick=args.quick)
    overrides = {k: getattr(args, k) for k in ("batch_size", "image_size", "warmup", "batches", "rounds")}
    protocol = dataclasses.replace(protocol, **{k: v for k, v in overrides.items() if v is not None})
    quick_models, quick_baselines = ["repvgg_a0", "repvgg_b0"], ["resnet18", "resnet34"]
    chosen = candidates(
        args.models if args.models is not None else (quick_models if args.quick else None),
        forms=args.forms,
        baselines=args.baselines if args.baselines is not None else (quick_baselines if args.quick else None),
        timm_peers=not args.no_timm,
        checkpoints=args.checkpoints,
    )
    if device != "cpu" and any(c.spec.endswith(":int8") for c in chosen):
        raise ModelConfigError("INT8 models run on the CPU: drop the int8 form or pass --device cpu.")
    print(f"Measuring {len(chosen)} networks: {protocol.describe()} ...")
    baseline = args.baseline or "resnet18"
    if not any(names(c, baseline) for c in chosen):
        if args.baseline is not None:  # asked for by name: it must be one of the networks timed (said now)
            raise ModelConfigError(
                f"`baseline` {args.baseline} is not among the networks timed "
                f"({', '.join(c.spec for c in chosen)}); give one of them, or time it too."
            )
        baseline = None  # the default, not timed here: no ratios
    result = run_bench(
        chosen, protocol, baseline=baseline, measure_memory=not args.no_memory, progress=args.progress
    )
    if not args.no_extras:
        result.extras["conv_density"] = conv_density(protocol)
        result.extras["residual_vs_plain"] = memory_of_residual_vs_plain(protocol)
    print_table(result)
    print("\n".join(extras_report(result)))
    for path in write_reports(result, Path(args.output), figures=not args.no_extras):
        print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from repvgg.studies.demo import DemoOptions, run_demo

    return 0 if run_demo(DemoOptions(**_options(args))) else 1


def _options(args: argparse.Namespace, *leave_out: str) -> dict[str, Any]:
    """A command's options as the keyword arguments of the library's configuration for it."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run", *leave_out)}


Command = Callable[[argparse.Namespace], int]
_PARAMETER = re.compile(r"`([A-Za-z_]\w*)`")


def parameters_as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message in the terms of ``parser``'s command line.

    Library messages name parameters in backticks (`batch_size`). Each one that is the ``dest`` of one of
    ``parser``'s options becomes that option's long flag (--batch-size, `ema_decay` of ``train``: --ema);
    any other backticked name is shown without its backticks.
    """
    flags = {
        action.dest: next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        for action in parser._actions
        if action.option_strings
    }
    return _PARAMETER.sub(lambda match: flags.get(match[1], match[1]), message)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, "(default: 256)", unless the help already says
    "(default: ...)" or the option has no default worth showing (None, off, empty, not given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        if (
            not action.option_strings
            or "(default:" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, list | tuple) and not default)
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)"
WORKERS_HELP = "data-loading processes (default: 0 for in-memory datasets, else up to 8)"


def _output_file(parser: argparse.ArgumentParser, help: str) -> None:
    """The output file of a command that writes one: after the checkpoint, or as --output (the shared
    name); :func:`main` takes whichever is given."""
    parser.add_argument("output_file", nargs="?", default=None, metavar="output", help=help)
    _shared(parser, "output", help="the same, as an option")


def _take_output_file(args: argparse.Namespace, parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """``args.output`` from the positional output or --output: one of them, or both alike.

    argparse leaves an optional positional empty once an option stands between it and the checkpoint
    (``export m.safetensors --to onnx m.onnx``); the one word left over is then that output."""
    if args.output_file is None and len(unknown) == 1 and not unknown[0].startswith("-"):
        args.output_file = unknown.pop()
    given = [value for value in (args.output_file, args.output) if value is not None]
    if not given:
        parser.error("give the file to write, after the checkpoint or as --output")
    if len(set(given)) > 1:
        parser.error(f"two output files were given ({given[0]} and {given[1]}): give one")
    args.output = given[0]


def _add_data_arguments(parser: argparse.ArgumentParser, segmentation: bool = False) -> None:
    """--data and --data-dir; with ``segmentation`` (eval) the segmentation sets too, for PSPNet files."""
    parser.add_argument(
        "--data",
        choices=(*DATASETS, *SEG_DATASETS) if segmentation else DATASETS,
        default=None if segmentation else "fashion-mnist",
        help="dataset; fashion-mnist comes from the Debian package dataset-fashion-mnist"
        + (" (default: fashion-mnist, or fashion-mnist-seg for a PSPNet checkpoint)" if segmentation else ""),
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="where the dataset lies (default: the Debian package's, for fashion-mnist)",
    )


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None``; any other type as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return kind
    return hint


def _field_option(name: str, config: type[RunConfig] = TrainConfig) -> tuple[list[str], dict[str, Any]]:
    """The flags and argparse options of the ``config`` class's field ``name``: its type, choices and help,
    and the default shown in the help."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)  # type: ignore[arg-type]
    meta, kind = field.metadata, _without_none(typing.get_type_hints(config)[name])
    shown = meta.get("default", field.default)
    options: dict[str, Any] = {"dest": name, "help": f"{meta['help']} (default: {shown})"}
    if kind is bool and meta.get("negatable"):
        options["action"] = argparse.BooleanOptionalAction
    elif kind is bool:
        options["action"] = "store_false" if field.default else "store_true"
    elif typing.get_origin(kind) is list:
        options.update(type=typing.get_args(kind)[0], nargs=meta.get("nargs", "+"))
    elif kind is not str:
        options["type"] = kind
    if "choices" in meta:
        options["choices"] = meta["choices"]
    flags = [meta.get("flag", name.replace("_", "-")), *meta.get("aliases", ())]
    return ["--" + flag for flag in flags], options


#: The options every command that has them shares: a training run's fields, with one flag, type and
#: meaning each, the default (and its help) given per command.
SHARED_OPTIONS = ("device", "workers", "batch_size", "image_size", "progress", "log_interval", "output")


def _shared(
    parser: argparse.ArgumentParser,
    name: str,
    default: Any = None,
    help: str | None = None,
    flags: Sequence[str] = (),
    dest: str | None = None,
) -> None:
    """Add the shared option ``name`` (one of :data:`SHARED_OPTIONS`) to a command, range-checked, with the
    command's default and help (``help`` replaces the training run's; a None default must say in the help
    what it means), extra ``flags`` and another ``dest``."""
    names, options = _field_option(name)
    if name in RANGES:
        options["type"] = _number(options["type"], *RANGES[name])
    if name == "device":
        options["type"] = device
    if options.get("action") is None:  # a switch keeps its help, which says what its absence means
        options["help"] = help if help is not None else options["help"].rsplit(" (default:", 1)[0]
        options["default"] = default
    options["dest"] = dest or options["dest"]
    parser.add_argument(*names, *flags, **options)


def _add_run_parser(
    commands: Any, name: str, config: type[RunConfig], run: Command, description: str
) -> argparse.ArgumentParser:
    """A training command (``train``, ``train-seg``): one flag per field of its configuration class, with the
    type, choices, help and shown default of the field, plus ``--config`` and ``--resume``. Flags default to
    'not given', so that --config and --resume values are overridden only when given."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=description, argument_default=argparse.SUPPRESS, formatter_class=_HelpFormatter
    )
    parser.add_argument("--config", default=None, help="a JSON configuration (e.g. a run's config.json)")
    parser.add_argument(
        "--resume", action="store_true", default=False, help="continue the run in --output with its settings"
    )
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        flags, options = _field_option(field.name, config)
        parser.add_argument(*flags, **options)
    for action in parser._actions:  # the fields' help names parameters; argparse reads help as %-format
        if action.help:
            action.help = parameters_as_flags(action.help, parser).replace("%", "%%")
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``repvgg`` parser, and the parser of each command by name."""
    parser = argparse.ArgumentParser(
        prog="repvgg",
        description="RepVGG: train multi-branch, convert exactly to plain 3x3 conv + ReLU, deploy.",
    )
    from repvgg import __version__

    parser.add_argument("--version", action="version", version=f"repvgg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(name, help=help, formatter_class=_HelpFormatter)
        sub.set_defaults(run=run)
        return sub

    models = command("models", _models_table, "table of every model: parameters, MACs, paper top-1")
    models.add_argument(
        "--format", choices=("table", "markdown", "json"), default="table", help="output format"
    )

    demo = command(
        "demo", _demo, "train A0 briefly on Fashion-MNIST, convert, verify, export, predict, time every form"
    )
    demo.add_argument("--model", default="repvgg_a0", help="model name")
    demo.add_argument("--epochs", type=positive_int, default=2, help="training epochs")
    demo.add_argument("--train-subset", type=positive_int, default=10000, help="train on this many images")
    demo.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    demo.add_argument("--repeats", type=positive_int, default=10, help="rounds of the speed measurement")
    demo.add_argument("--images", type=positive_int, default=8, help="test images to write and predict")
    demo.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="the fast backend to time")
    _shared(demo, "batch_size", 256, "batch size of the speed measurement")
    _shared(demo, "image_size", help="train and time at this size (default: Fashion-MNIST's 28)")
    _shared(demo, "device", help=DEVICE_HELP)
    _shared(demo, "workers", help=WORKERS_HELP)
    _shared(demo, "progress")
    _shared(demo, "log_interval", 50)
    _shared(demo, "output", "runs/demo", "run folder (replaced on every run)")

    _add_run_parser(
        commands,
        "train",
        TrainConfig,
        _train,
        "train a model with the paper's recipe, then convert and evaluate both forms",
    )

    bench = command("bench", _bench, "the paper's speed and memory comparisons, measured here")
    bench.add_argument(
        "--quick", action="store_true", help="A0/B0, ResNet-18/34, small batches: minutes on a CPU"
    )
    bench.add_argument(
        "--models", nargs="*", default=None, help="RepVGG models (default: all; none with a bare --models)"
    )
    bench.add_argument(
        "--forms",
        nargs="+",
        choices=("train", "deploy", "int8"),
        default=["train", "deploy"],
        help="RepVGG forms to time (int8: CPU only, PTQ on random input, for speed)",
    )
    bench.add_argument(
        "--checkpoints", nargs="+", default=(), help="also time these checkpoint files (float or INT8)"
    )
    bench.add_argument(
        "--baselines", nargs="*", default=None, help="torchvision baselines (default: Table 4's)"
    )
    bench.add_argument("--no-timm", action="store_true", help="leave out timm's re-parameterized RepVGG")
    bench.add_argument(
        "--baseline",
        default=None,
        help="speed ratios are relative to this network, one of those timed (default: resnet18 when timed)",
    )
    _shared(bench, "device", help=DEVICE_HELP)
    _shared(bench, "batch_size", help="images per timed batch (default: the protocol's)")
    _shared(bench, "image_size", help="timed image size (default: the protocol's, 224)")
    for flag, kind in (
        ("--warmup", non_negative_int),
        ("--batches", positive_int),
        ("--rounds", positive_int),
    ):
        bench.add_argument(flag, type=kind, default=None, help="override the protocol")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    bench.add_argument("--no-extras", action="store_true", help="skip Table 1, Figure 3 and the figures")
    _shared(bench, "progress")
    _shared(bench, "output", "runs/bench", "folder for bench.json, bench.md and the figures")

    evaluation = command("eval", _eval, "top-1/top-5 and speed of any checkpoint on a dataset")
    evaluation.add_argument(
        "checkpoint", help="a checkpoint in any format repvgg reads (a PSPNet's: mIoU on a segmentation set)"
    )
    _add_data_arguments(evaluation, segmentation=True)
    evaluation.add_argument(
        "--val-subset", type=positive_int, default=None, help="evaluate on this many images (default: all)"
    )
    evaluation.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision")
    evaluation.add_argument(
        "--backend", choices=BACKEND_CHOICES, default=None, help="convert, then run with this backend"
    )
    _shared(evaluation, "batch_size", 256, "images per batch")
    _shared(evaluation, "image_size", help="evaluate at this size (default: the checkpoint's)")
    _shared(evaluation, "device", help=DEVICE_HELP)
    _shared(evaluation, "workers", help=WORKERS_HELP)
    _shared(evaluation, "progress")
    _shared(
        evaluation,
        "output",
        help="write the figures with each class's top-1 to this .json or .csv, and the confusion matrix as "
        "a PNG beside it (timm's --results-file)",
        flags=("--results-file",),
        dest="results_file",
    )

    convert = command("convert", _convert, "convert a training-form checkpoint to deploy form, verified")
    convert.add_argument("checkpoint", help="a training-form checkpoint in any format repvgg reads")
    _output_file(convert, "where to write the deploy-form checkpoint")
    convert.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default="repvgg",
        help="key names to write: ours (safetensors + metadata), the authors', or timm's",
    )

    verify = command("verify", _verify, "check a train/deploy checkpoint pair (or one train checkpoint)")
    verify.add_argument("checkpoint", help="a training-form checkpoint")
    verify.add_argument("deploy_checkpoint", nargs="?", default=None, help="its deploy-form checkpoint")

    export = command("export", _export, "export to ONNX or TorchScript, checked against PyTorch")
    export.add_argument("checkpoint", help="a checkpoint in any format repvgg reads (converted if needed)")
    _output_file(export, "the file to write: .onnx (ONNX) or .pt/.ts (TorchScript)")
    export.add_argument(
        "--to", choices=EXPORT_TARGETS, default=None, help="the format (default: from the output's suffix)"
    )
    _shared(export, "image_size", help="example input size (default: the training size)")
    _shared(export, "batch_size", 2, "with --image-size: the example batch")

    predict = command("predict", _predict, "top-k classes of image files")
    predict.add_argument("checkpoint", help="a checkpoint in any format repvgg reads")
    predict.add_argument(
        "images", nargs="+", help="image files, folders (searched recursively) or glob patterns"
    )
    predict.add_argument("--topk", type=positive_int, default=5, help="classes to show per image")
    predict.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=None,
        help="run the model with this; auto builds and times every backend first (seconds: worth it for many "
        "images) (default: the way repvgg optimize recorded in it, else eager)",
    )
    predict.add_argument(
        "--preprocessing",
        choices=("fashion-mnist", "cifar10", "imagenet"),
        default=None,
        help="use a dataset's preprocessing instead of the one saved in the checkpoint",
    )
    _shared(predict, "batch_size", 32, "images per batch")
    _shared(predict, "image_size", help="predict at this size (default: the checkpoint's)")
    _shared(predict, "device", help=DEVICE_HELP)
    _shared(predict, "workers", 0, "processes that read and prepare the images")
    _shared(predict, "progress")
    _shared(
        predict,
        "output",
        help="also write the predictions to this .csv or .json file (a PSPNet's: the folder for its masks, "
        "one per image at the image's path below the images' common folder)",
    )
    predict.add_argument(
        "--overwrite",
        action="store_true",
        help="a PSPNet's masks may replace mask files already in --output (else refused before any work)",
    )

    fast = command(
        "optimize",
        _optimize,
        "find the fastest backend and precision that keep accuracy here, and write a checkpoint that runs so",
    )
    fast.add_argument("checkpoint", help="a float checkpoint (training form is converted first)")
    _output_file(
        fast, "where to write the winner: .safetensors, or .onnx when onnxruntime wins (the suffix follows)"
    )
    _add_data_arguments(fast)
    fast.add_argument(
        "--precision", choices=PRECISION_CHOICES, default="auto", help="precisions to search (auto: all)"
    )
    fast.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="backends to search")
    fast.add_argument(
        "--max-drop", type=_number(float, 0, 100), default=0.5, help="largest top-1 loss allowed, in points"
    )
    fast.add_argument(
        "--calib", type=positive_int, default=512, help="INT8 calibration images (training split)"
    )
    fast.add_argument(
        "--val-subset",
        type=positive_int,
        default=None,
        help="judge on this many validation images (default: all)",
    )
    fast.add_argument("--repeats", type=positive_int, default=10, help="interleaved timing rounds")
    _shared(fast, "batch_size", 64, "images per batch (the timed batch too)")
    _shared(fast, "image_size", help="image size (default: the checkpoint's)")
    _shared(fast, "device", help=DEVICE_HELP)
    _shared(fast, "workers", help=WORKERS_HELP)
    _shared(fast, "progress")
    fast.add_argument(
        "--overwrite",
        action="store_true",
        help="the winner may replace a file of the other suffix (OUT.onnx for OUT.safetensors, or back)",
    )

    _add_run_parser(
        commands,
        "train-seg",
        SegTrainConfig,
        _train_seg,
        "train PSPNet over a RepVGG backbone, convert it, evaluate both forms (mIoU)",
    )

    ablate = command(
        "ablate", _ablate, "train block variants with identical settings and seeds: Tables 6 and 7"
    )
    ablate.add_argument("--model", default="repvgg_a0", help="model name")
    ablate.add_argument(
        "--variants",
        nargs="+",
        default=["repvgg", "no_identity", "no_1x1", "plain"],
        help="block designs and/or residual_reorg (default: Table 6's four)",
    )
    ablate.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..K-1 for every variant")
    _add_data_arguments(ablate)
    ablate.add_argument("--epochs", type=positive_int, default=1, help="training epochs of every run")
    ablate.add_argument(
        "--lr", type=positive_float, default=None, help="learning rate (default: 0.1 x batch / 256)"
    )
    ablate.add_argument("--train-subset", type=positive_int, default=None, help="train on this many images")
    ablate.add_argument("--val-subset", type=positive_int, default=None, help="evaluate on this many images")
    ablate.add_argument("--speed-batch", type=positive_int, default=64, help="batch for the speed columns")
    _shared(ablate, "batch_size", 128, "images per step")
    _shared(ablate, "image_size", help="training image size (default: the dataset's native size)")
    _shared(ablate, "device", help=DEVICE_HELP)
    _shared(ablate, "workers", help=WORKERS_HELP)
    _shared(ablate, "progress")
    _shared(ablate, "log_interval", 50)
    _shared(ablate, "output", "runs/ablate", "study folder (resumed if it exists)")

    shard = command(
        "shard",
        _shard,
        "write an image folder (train/, val/) as WebDataset tar shards for `train --data shards`",
    )
    shard.add_argument(
        "source", help="an ImageNet-layout folder: SOURCE/train/<class>/*, SOURCE/val/<class>/*"
    )
    shard.add_argument("output", help="the folder to write OUTPUT/train/shard-*.tar, OUTPUT/val/shard-*.tar")
    shard.add_argument(
        "--shard-size", type=positive_int, default=1000, help="images per shard (the last: fewer)"
    )
    shard.add_argument(
        "--seed", type=seed, default=0, help="the shuffle of the training images across shards"
    )
    shard.add_argument("--overwrite", action="store_true", help="replace the shards in OUTPUT")
    _shared(shard, "progress")

    quantize = command(
        "quantize", _quantize, "INT8 for the CPU: post-training calibration, or quantization-aware training"
    )
    quantize.add_argument("checkpoint", help="a float checkpoint (training form is converted first)")
    _output_file(quantize, "where to write the INT8 checkpoint (.safetensors)")
    _add_data_arguments(quantize)
    quantize.add_argument("--calib", type=non_negative_int, default=512, help="calibration images")
    quantize.add_argument(
        "--qat-epochs",
        type=non_negative_int,
        default=0,
        help="quantization-aware fine-tuning epochs, 0 for PTQ only",
    )
    quantize.add_argument(
        "--qat-lr", type=positive_float, default=1e-3, help="QAT learning rate (cosine to 0)"
    )
    quantize.add_argument(
        "--qat-subset", type=positive_int, default=None, help="QAT on this many training images"
    )
    quantize.add_argument(
        "--weights",
        choices=("per-channel", "per-tensor"),
        default="per-channel",
        help="weight scales: one per output channel, or one per layer",
    )
    quantize.add_argument("--seed", type=seed, default=0, help="random seed")
    _shared(quantize, "batch_size", 64, "images per batch")
    _shared(quantize, "image_size", help="calibrate at this size (default: the checkpoint's)")
    _shared(quantize, "device", "cpu", "INT8 runs on the CPU, so only cpu")
    _shared(quantize, "workers", 0, "data-loading processes")
    _shared(quantize, "progress")
    _shared(quantize, "log_interval", 50)
    return parser, dict(commands.choices)


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _build_parsers()
    args, unknown = parser.parse_known_args(argv)
    if hasattr(args, "output_file"):
        _take_output_file(args, commands[args.command], unknown)
    if unknown:  # said by the command's parser, so that its usage and name come with the error
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from repvgg.exceptions import RepVGGError

    run: Command = args.run
    try:
        return run(args)
    except RepVGGError as error:
        message = parameters_as_flags(str(error), commands[args.command])
        print(f"repvgg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as error:  # a file the user named cannot be read or written
        where = f"{error.filename}: " if error.filename else ""
        reason = error.strerror or str(error)
        print(
            f"repvgg {args.command}: error: {where}{reason}; check the path and permissions.", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(f"repvgg {args.command}: interrupted", file=sys.stderr)
        return 130
