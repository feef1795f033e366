"""The main job (``make demo``): train briefly, convert, verify, export, predict, and time every form.

Each step is the one a user runs by hand (``repvgg train``, ``convert``, ``verify``, ``export``,
``predict``), called as a library so that the whole path is shown in one command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from repvgg.engine.config import TrainConfig
from repvgg.engine.data import build_data, write_sample_images
from repvgg.engine.training import train
from repvgg.exceptions import TrainingError
from repvgg.io.checkpoints import load_checkpoint
from repvgg.runtime.convert import convert_checkpoint, verify_checkpoints
from repvgg.runtime.device import device_name, resolve_device
from repvgg.runtime.export import export_model
from repvgg.runtime.measure import count_parameters, time_interleaved
from repvgg.runtime.optimize import optimize
from repvgg.runtime.predict import predict


@dataclass(frozen=True)
class DemoOptions:
    model: str = "repvgg_a0"
    epochs: int = 2
    train_subset: int = 10000
    data_dir: str | None = None
    output: str = "runs/demo"
    batch_size: int = 256
    repeats: int = 10
    images: int = 8
    backend: str = "auto"
    image_size: int | None = None  # None: Fashion-MNIST's 28 px
    device: str | None = None  # None: CUDA when available
    workers: int | None = None
    progress: bool = True
    log_interval: int = 50


def run_demo(options: DemoOptions) -> bool:
    """Run every step, printing what it shows; True when both forms agree and every check passed."""
    output = Path(options.output)
    print(
        f"1. training {options.model} on {options.train_subset} Fashion-MNIST images for {options.epochs} "
        "epoch(s) ..."
    )
    summary = train(
        TrainConfig(
            model=options.model,
            data="fashion-mnist",
            data_dir=options.data_dir,
            epochs=options.epochs,
            train_subset=options.train_subset,
            output=str(output),
            warmup_epochs=0.2,
            image_size=options.image_size,
            device=options.device,
            workers=options.workers,
            progress=options.progress,
            log_interval=options.log_interval,
            overwrite=True,  # the demo's folder is replaced on every run
        )
    )
    train_form, deploy_form = summary["train_form"], summary["deploy_form"]
    print(
        f"   training form top-1 {train_form['top1']:.2f}%, deploy form top-1 {deploy_form['top1']:.2f}% "
        f"(difference {summary['top1_difference']:.4f} points: "
        f"{'agree' if summary['forms_agree'] else 'DISAGREE'})"
    )

    train_file, deploy_file = output / "model_train.safetensors", output / "model_deploy.safetensors"
    conversion = convert_checkpoint(train_file, deploy_file)
    print(f"2. convert {train_file} -> {deploy_file}, checked in float64:\n   {conversion.report}")
    verified = verify_checkpoints(train_file, deploy_file)
    print(f"3. verify the saved pair (float32 weights):\n   {verified}")

    trained, deployed = load_checkpoint(train_file).eval(), load_checkpoint(deploy_file).eval()
    train_params, deploy_params = count_parameters(trained), count_parameters(deployed)
    print(
        f"   parameters: training form {train_params:,}, deploy form {deploy_params:,} "
        f"({1 - deploy_params / train_params:.1%} fewer)"
    )

    exported = export_model(deployed, output / "model.onnx", to="onnx")
    print(f"4. export ONNX: {exported}")

    bundle = build_data("fashion-mnist", options.data_dir)
    images = write_sample_images(bundle, output / "images", options.images)
    device = resolve_device(options.device, TrainingError)
    predictions, _ = predict(deploy_file, images, topk=1, device=str(device))
    correct = 0
    print(f"5. predict {len(images)} test images (true class in the file name):")
    for prediction in predictions:
        label, probability = prediction.top[0]
        right = Path(prediction.path).stem.split("_", 1)[1] == label.replace("/", "-").replace(" ", "-")
        correct += right
        verdict = "" if right else "  (wrong)"
        print(f"   {Path(prediction.path).name:28s} -> {label} ({probability:.0%}){verdict}")
    print(f"   {correct} of {len(predictions)} right")

    size = options.image_size or 28
    inputs = torch.randn(options.batch_size, trained.in_chans, size, size, device=device)
    trained, deployed = trained.to(device), deployed.to(device)
    print(
        f"6. inference speed on {device_name(device)} ({torch.get_num_threads()} CPU threads, batch "
        f"{options.batch_size}, {size}x{size}, float32), choosing a backend ({options.backend}) ..."
    )
    fastest = optimize(deployed, options.backend, example_input=inputs, device=device)
    for name, reason in fastest.skipped.items():
        print(f"   ({name} not used: {reason})")
    timed: dict[str, torch.nn.Module] = {"training form, eager": trained, "deploy form, eager": deployed}
    if fastest.backend != "eager":  # eager chosen (or asked for) is the deploy form's eager row already
        timed[f"deploy form, {fastest.backend}"] = fastest
    speeds = time_interleaved(timed, inputs, rounds=options.repeats)
    for name, speed in speeds.items():
        print(
            f"   {name:28s} {speed.images_per_s:8.0f} images/s  "
            f"({speed.median_s * 1000:.1f} ms/batch, spread {speed.spread:.0%})"
        )
    rate = {name: speed.images_per_s for name, speed in speeds.items()}
    trained_rate = rate["training form, eager"]
    ratio = f"   deploy / training speed: {rate['deploy form, eager'] / trained_rate:.2f}x eager"
    if fastest.backend != "eager":
        ratio += f", {rate[f'deploy form, {fastest.backend}'] / trained_rate:.2f}x with {fastest.backend}"
    print(ratio)
    return bool(summary["forms_agree"]) and conversion.report.passed and verified.passed
