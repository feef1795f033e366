"""INT8 post-training quantization at several training stages: which calibration keeps top-1?

For each checkpoint (e.g. RepVGG-A0 and QARepVGG-A0 after 1, 3 and 15 epochs), the float32 top-1 on the whole
Fashion-MNIST test set, and the drop of every INT8 method: the x86 engine (histogram activation observers,
this package's `repvgg quantize`; and with min-max observers) and onnxruntime's static QDQ quantization
calibrated by min-max, entropy or percentile. Calibration: the same training images for every method.

    python benchmarks/ptq_stages.py runs/ptq-stages/*_e*.safetensors --calib 512 \
        --json benchmarks/results/ptq_stages.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.ao.quantization import HistogramObserver, MinMaxObserver
from torch.utils.data import DataLoader

from repvgg import load_checkpoint
from repvgg.core.int8 import convert_int8, quantize_ptq, x86_engine
from repvgg.core.reparam import to_deploy_form
from repvgg.engine.data import build_data, calibration_images, collate_refusing_bad
from repvgg.io.machine import cpu_features
from repvgg.runtime.device import device_name
from repvgg.runtime.optimize import onnxruntime_int8

os.environ.setdefault("HF_HUB_OFFLINE", "1")
Runner = Callable[[Tensor], Tensor]


def top1(runner: Runner, loader: DataLoader) -> float:
    correct = count = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((runner(images).argmax(1) == labels).sum())
            count += len(labels)
    return 100.0 * correct / count


def x86_with(observer: type, model: torch.nn.Module, calibration: list[Tensor]) -> Runner:
    """The x86 engine with ``observer`` for activations over the full 8-bit range (its default keeps 7 bits:
    ``reduce_range``, which CPUs without VNNI need against overflow), weights per channel as by default."""
    from torch.ao.quantization import QConfig, default_per_channel_weight_observer
    from torch.ao.quantization.quantize_fx import prepare_fx

    from repvgg.core.info import model_info
    from repvgg.core.int8 import plain_network

    plain = plain_network(to_deploy_form(model)[0]).float().cpu().eval()
    qconfig = QConfig(
        activation=observer.with_args(reduce_range=False), weight=default_per_channel_weight_observer
    )
    with x86_engine():
        prepared = prepare_fx(plain, {"": qconfig}, (calibration[0][:1],))
        for batch in calibration:
            prepared(batch)
    return convert_int8(prepared, model_info(model), "ptq", "per-channel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bundle = build_data("fashion-mnist", args.data_dir)
    loader = DataLoader(bundle.val, args.batch_size, collate_fn=collate_refusing_bad)
    calibration = [
        images
        for images, _ in DataLoader(
            calibration_images(bundle, args.calib, seed=0), 64, collate_fn=collate_refusing_bad
        )
    ]
    methods: dict[str, Callable[[torch.nn.Module], Runner]] = {
        "x86 histogram 7-bit (default)": lambda m: quantize_ptq(m, calibration),
        "x86 histogram 8-bit": lambda m: x86_with(HistogramObserver, m, calibration),
        "x86 min-max 8-bit": lambda m: x86_with(MinMaxObserver, m, calibration),
        "onnxruntime min-max": lambda m: onnxruntime_int8(m, calibration, calibration[0]),
        "onnxruntime entropy": lambda m: onnxruntime_int8(m, calibration, calibration[0], "entropy"),
        "onnxruntime percentile": lambda m: onnxruntime_int8(m, calibration, calibration[0], "percentile"),
    }
    rows = []
    start = time.perf_counter()
    for path in args.checkpoints:
        model = to_deploy_form(load_checkpoint(path).eval())[0].eval()
        row = {"checkpoint": path, "fp32_top1": top1(model, loader), "drops": {}}
        for name, build in methods.items():
            row["drops"][name] = row["fp32_top1"] - top1(build(model), loader)
        rows.append(row)
        print(
            f"{path}: fp32 {row['fp32_top1']:.2f}; "
            + ", ".join(f"{k} {v:+.2f}" for k, v in row["drops"].items())
        )
    print(
        f"\n{device_name(torch.device('cpu'))}; Fashion-MNIST test set ({len(bundle.val)} images), "
        f"{args.calib} calibration images from the training set; top-1 drop in points (positive: INT8 is "
        "worse); "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print("| checkpoint | fp32 top-1 | " + " | ".join(methods) + " |")
    print("|---|---:|" + "---:|" * len(methods))
    for row in rows:
        cells = " | ".join(f"{row['drops'][name]:+.2f}" for name in methods)
        print(f"| {os.path.basename(row['checkpoint'])} | {row['fp32_top1']:.2f} | {cells} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"cpu": cpu_features(), "calib": args.calib, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
