"""Adversarial command lines, generated from tables: every user mistake ends in one error line
``repvgg COMMAND: error: ...`` and exit status 2 (argparse: its usage lines, then one error line), never a
traceback, and no file that existed before is changed. Pickles are refused, never executed."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import repvgg
from repvgg.cli import _build_parsers, main
from tests.helpers import small_model
from tests.test_data import fake_fashion_mnist, make_image_folder, write_idx

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("default::repvgg.exceptions.RepVGGWarning"),  # as the command line shows them
]

COMMANDS = set(_build_parsers()[1])
CUDA = torch.cuda.is_available()
MARKER = "executed-by-unpickling"  # a file the malicious pickles create if they are ever run


class Payload:
    """Pickled inside a checkpoint: unpickling it would create the marker file (it must never happen)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict[str, str]) -> None:
        Path(state["marker"]).write_text("unpickled")


class Exploit:
    """The classic pickle exploit: unpickling calls ``open(marker, "w")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


# ---------------------------------------------------------------------------------------------------------
# The files the cases use, built once: a fake Fashion-MNIST, good checkpoints and many bad files.


def _bitflipped(good: bytes) -> bytes:
    """``good`` with one bit flipped in the header: the first tensor's data offsets no longer fit."""
    at = good.index(b'"data_offsets":[') + len(b'"data_offsets":[')
    return good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1 :]


def _edited_record(good: bytes, **changes: object) -> bytes:
    """``good`` (a safetensors file of this package) with its record edited: ``config`` keys merged into the
    architecture, any other key replacing that metadata entry (a string, or JSON of anything else)."""
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + length])
    metadata = header["__metadata__"]
    for key, value in changes.items():
        if key == "config":
            metadata["config"] = json.dumps({**json.loads(metadata["config"]), **value})  # type: ignore[dict-item]
        else:
            metadata[key] = value if isinstance(value, str) else json.dumps(value)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + good[8 + length :]


def _nan_weights(good: bytes) -> bytes:
    """``good`` with the first float32 of a kernel overwritten by NaN (a damaged copy that still reads)."""
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + length])
    begin = next(v["data_offsets"][0] for k, v in sorted(header.items()) if k.endswith("conv.weight"))
    start = 8 + length + begin
    return good[:start] + b"\x00\x00\xc0\x7f" + good[start + 4 :]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    a: dict[str, Path] = {"root": root, "marker": root / MARKER}
    a["data"] = fake_fashion_mnist(root / "fashion", train=128, test=64)
    a["images"] = make_image_folder(root / "images")
    a["shards"] = root / "shards"
    assert main(["shard", str(a["images"]), str(a["shards"]), "--shard-size", "3", "--no-progress"]) == 0
    a["ckpt"] = repvgg.save_checkpoint(small_model(), root / "small.safetensors")
    a["deploy"] = root / "small_deploy.safetensors"
    repvgg.convert_checkpoint(a["ckpt"], a["deploy"])
    a["int8"] = root / "small_int8.safetensors"
    quantize = ["quantize", str(a["ckpt"]), str(a["int8"]), "--calib", "8", "--data-dir", str(a["data"])]
    assert main([*quantize, "--batch-size", "8", "--no-progress"]) == 0
    a["pspnet"] = repvgg.save_checkpoint(
        repvgg.pspnet("repvgg_a0", 3, head_channels=8).eval(), root / "pspnet.safetensors"
    )
    a["other_deploy"] = root / "five_classes_deploy.safetensors"  # another architecture (5 classes)
    repvgg.save_checkpoint(repvgg.reparameterize(small_model(num_classes=5)), a["other_deploy"])
    rng = np.random.default_rng(0)
    for i in range(2):
        a[f"png{i}"] = root / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(a[f"png{i}"])
    good = a["ckpt"].read_bytes()
    files = {
        "empty": b"",
        "text": b"these are not weights\n",
        "truncated": good[: len(good) // 2],
        "bitflip": _bitflipped(good),
        "nan_weights": _nan_weights(good),
        "huge_header": (2**40).to_bytes(8, "little") + good[8:],
        **{name: _edited_record(good, **changes) for name, changes in EDITED_RECORDS.items()},
    }
    for name, content in files.items():
        a[name] = root / f"{name}.safetensors"
        a[name].write_bytes(content)
    a["folder"] = root / "folder.safetensors"
    a["folder"].mkdir()
    a["missing"] = root / "missing.safetensors"
    timm = repvgg.convert_state_dict(small_model().state_dict(), to="timm")
    a["timm_partial"] = root / "timm_partial.pth"  # timm's names, half the keys gone
    torch.save(dict(list(timm.items())[: len(timm) // 2]), a["timm_partial"])
    a["random_tensors"] = root / "random_tensors.pth"
    torch.save({"foo": torch.randn(3, 3), "bar": torch.randn(5)}, a["random_tensors"])
    a["pickle_class"] = root / "pickle_class.pth"
    torch.save(
        {"state_dict": small_model().state_dict(), "extra": Payload(str(a["marker"]))}, a["pickle_class"]
    )
    a["pickle_exploit"] = root / "pickle_exploit.pt"
    a["pickle_exploit"].write_bytes(pickle.dumps({"model": Exploit(str(a["marker"]))}, protocol=2))
    a["torch_truncated"] = root / "torch_truncated.pth"
    whole = root / "whole.pth"
    torch.save(small_model().state_dict(), whole)
    a["torch_truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    configs = {
        "cfg_invalid": "{not json",
        "cfg_list": "[1, 2]",
        "cfg_string": '"epochs"',
        "cfg_types": json.dumps({"lr": "fast"}),
        "cfg_unknown": json.dumps({"lr": 0.1, "colour": "red"}),
        "cfg_null": json.dumps({"momentum": None}),
        "cfg_bool": json.dumps({"seed": True}),
        "cfg_range": json.dumps({"label_smoothing": 2}),
        "cfg_nested": json.dumps({"lr": {"value": 0.1}}),
        "cfg_empty": "",
        "cfg_good": json.dumps({"epochs": 1}),
    }
    for name, text in configs.items():
        a[name] = root / f"{name}.json"
        a[name].write_text(text)
    a["cfg_missing"] = root / "missing.json"
    a["data_missing"] = root / "no-such-folder"
    a["data_empty"] = root / "empty-folder"
    a["data_empty"].mkdir()
    a["data_corrupt"] = shutil.copytree(a["data"], root / "fashion-corrupt")
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (a["data_corrupt"] / name).write_bytes(b"garbage")
    a["data_truncated"] = shutil.copytree(a["data"], root / "fashion-truncated")
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        raw = gzip.decompress((a["data"] / name).read_bytes())
        (a["data_truncated"] / name).write_bytes(gzip.compress(raw[: len(raw) // 2]))
    a["data_bad_label"] = shutil.copytree(a["data"], root / "fashion-bad-label")  # a label of no class
    for name, count in (("train-labels-idx1-ubyte.gz", 128), ("t10k-labels-idx1-ubyte.gz", 64)):
        write_idx(a["data_bad_label"] / name, np.full(count, 200, dtype=np.uint8))
    a["one_class"] = root / "one-class"  # an image folder of a single class
    for split in ("train", "val"):
        (a["one_class"] / split / "shoe").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                a["one_class"] / split / "shoe" / f"{i}.png"
            )
    a["data_mismatch"] = shutil.copytree(a["data"], root / "fashion-mismatch")  # 5 labels for 128 images
    write_idx(a["data_mismatch"] / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    write_idx(a["data_mismatch"] / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    return a


# ---------------------------------------------------------------------------------------------------------
# The tables. ``{name}`` in an argument is the path of the asset ``name``; ``{tmp}`` is the case's folder.


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    code: int = 2
    copies: dict[str, str] = field(default_factory=dict)  # file in {tmp} -> the asset copied there first
    skip: str | None = None


def args(text: str, *more: str) -> tuple[str, ...]:
    """A command line from words (``{name}`` placeholders have no spaces), and ``more`` words as they are."""
    return (*text.split(), *more)


BASE: dict[str, tuple[str, ...]] = {  # a small, valid run of every command; a case adds one mistake to it
    "eval": args("eval {ckpt} --data-dir {data} --val-subset 16 --batch-size 16"),
    "predict": args("predict {ckpt} {png0} {png1}"),
    "convert": args("convert {ckpt} {tmp}/out.safetensors"),
    "verify": args("verify {ckpt}"),
    "export": args("export {ckpt} --to torchscript {tmp}/model.pt"),
    "quantize": args("quantize {ckpt} {tmp}/q.safetensors --data-dir {data} --calib 8 --no-progress"),
    "optimize": args(
        "optimize {ckpt} {tmp}/o.safetensors --data-dir {data} --val-subset 16 --calib 8 --backend eager "
        "--repeats 1"
    ),
    "train": args(
        "train --data-dir {data} --output {tmp}/run --epochs 1 --train-subset 32 --val-subset 16 "
        "--batch-size 16 --no-progress"
    ),
    "train-seg": args(
        "train-seg --data-dir {data} --output {tmp}/seg --epochs 1 --train-subset 16 --val-subset 8 "
        "--batch-size 8 --no-progress"
    ),
    "ablate": args(
        "ablate --data-dir {data} --output {tmp}/ablate --epochs 1 --train-subset 32 --val-subset 16 "
        "--batch-size 16 --seeds 1 --variants repvgg --no-progress"
    ),
    "bench": args(  # no built-in network: only the checkpoint, last, is timed
        "bench --quick --models --baselines --no-timm --no-extras --no-memory --output {tmp}/bench "
        "--checkpoints {ckpt}"
    ),
    "demo": args(
        "demo --data-dir {data} --output {tmp}/demo --epochs 1 --train-subset 32 --batch-size 4 --repeats 1 "
        "--images 2 --backend eager"
    ),
    "models": args("models"),
    "shard": args("shard {images} {tmp}/shards --shard-size 3 --no-progress"),
}

BAD_WORDS = ("abc", "1e999", "nan", "")  # not numbers, or not finite
POSITIVE_INT = ("0", "-1", "-5", "2.5", *BAD_WORDS)
NON_NEGATIVE_INT = ("-1", "-5", "2.5", *BAD_WORDS)
POSITIVE_FLOAT = ("0", "-1", "-5", "inf", "-inf", *BAD_WORDS)
NON_NEGATIVE_FLOAT = ("-1", "-5", "inf", *BAD_WORDS)
FRACTION = (*NON_NEGATIVE_FLOAT, "1.5")  # in [0, 1]
IMAGE_SIZE = (*POSITIVE_INT, "4", "5000")  # from 8 to 4096 pixels
WORKERS = (*NON_NEGATIVE_INT, "1000")  # at most 256
SEED = (*NON_NEGATIVE_INT, str(2**64))

NUMERIC: dict[str, dict[str, tuple[str, ...]]] = {  # command -> option -> bad values
    "eval": {
        "--batch-size": POSITIVE_INT,
        "--val-subset": POSITIVE_INT,
        "--workers": WORKERS,
        "--image-size": IMAGE_SIZE,
    },
    "optimize": {
        "--max-drop": (*NON_NEGATIVE_FLOAT, "100.5", "1000"),  # top-1 points: at most 100
        "--calib": POSITIVE_INT,
        "--val-subset": POSITIVE_INT,
        "--repeats": POSITIVE_INT,
        "--batch-size": POSITIVE_INT,
        "--workers": WORKERS,
        "--image-size": IMAGE_SIZE,
    },
    "predict": {
        "--topk": POSITIVE_INT,
        "--batch-size": POSITIVE_INT,
        "--workers": WORKERS,
        "--image-size": IMAGE_SIZE,
    },
    "quantize": {
        "--calib": POSITIVE_INT,
        "--qat-epochs": NON_NEGATIVE_INT,
        "--qat-lr": POSITIVE_FLOAT,
        "--qat-subset": POSITIVE_INT,
        "--batch-size": POSITIVE_INT,
        "--seed": SEED,
    },
    "train": {
        "--epochs": POSITIVE_INT,
        "--batch-size": POSITIVE_INT,
        "--lr": POSITIVE_FLOAT,
        "--momentum": FRACTION,
        "--weight-decay": NON_NEGATIVE_FLOAT,
        "--warmup-epochs": NON_NEGATIVE_FLOAT,
        "--label-smoothing": FRACTION,
        "--mixup": NON_NEGATIVE_FLOAT,
        "--ema": (*POSITIVE_FLOAT, "1.5"),
        "--image-size": IMAGE_SIZE,
        "--seed": SEED,
        "--workers": WORKERS,
        "--train-subset": POSITIVE_INT,
        "--val-subset": POSITIVE_INT,
        "--accum-steps": (*POSITIVE_INT, "2000"),  # at most 1024
        "--clip-grad": POSITIVE_FLOAT,
        "--min-lr": NON_NEGATIVE_FLOAT,
        "--cutmix": NON_NEGATIVE_FLOAT,
        "--random-erasing": FRACTION,
        "--drop-path": (*FRACTION, "1", "0.995"),  # below 1: a rate of 1 drops every path
        "--crop-pct": ("0", "0.01", "1.5", "-1", *BAD_WORDS),
        "--keep-best": (*POSITIVE_INT, "101"),
        "--patience": POSITIVE_INT,
    },
    "shard": {"--shard-size": POSITIVE_INT, "--seed": SEED},
    "train-seg": {
        "--epochs": POSITIVE_INT,
        "--batch-size": POSITIVE_INT,
        "--lr": POSITIVE_FLOAT,  # as train's
        "--num-classes": (*POSITIVE_INT, "1"),  # a segmenter needs two classes at least
        "--image-size": IMAGE_SIZE,
        "--head-channels": POSITIVE_INT,
        "--aux-weight": NON_NEGATIVE_FLOAT,
        "--train-subset": POSITIVE_INT,
        "--val-subset": POSITIVE_INT,
        "--seed": SEED,
    },
    "ablate": {
        "--seeds": POSITIVE_INT,
        "--epochs": POSITIVE_INT,
        "--batch-size": POSITIVE_INT,
        "--lr": POSITIVE_FLOAT,
        "--speed-batch": POSITIVE_INT,
        "--train-subset": POSITIVE_INT,
        "--val-subset": POSITIVE_INT,
    },
    "bench": {
        "--batch-size": POSITIVE_INT,
        "--image-size": IMAGE_SIZE,
        "--warmup": NON_NEGATIVE_INT,
        "--batches": POSITIVE_INT,
        "--rounds": POSITIVE_INT,
    },
    "export": {"--image-size": IMAGE_SIZE, "--batch-size": POSITIVE_INT},
    "demo": {
        "--epochs": POSITIVE_INT,
        "--train-subset": POSITIVE_INT,
        "--batch-size": POSITIVE_INT,
        "--repeats": POSITIVE_INT,
        "--images": POSITIVE_INT,
    },
}

BAD_DEVICES = ("foo", "gpu", "CUDA", "mps", "cuda:x", "")
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {  # command -> option -> bad values
    "eval": {"--device": BAD_DEVICES, "--backend": ("x", ""), "--amp": ("x", "FP16"), "--data": ("x",)},
    "predict": {"--device": BAD_DEVICES, "--backend": ("x",), "--preprocessing": ("x",)},
    "bench": {
        "--device": BAD_DEVICES,
        "--forms": ("x",),
        "--models": ("repvgg_z9",),
        "--baselines": ("resnet999",),
        "--baseline": ("resnet999", "resnet50"),  # unknown, or not among the networks timed
    },
    "train": {
        "--device": BAD_DEVICES,
        "--amp": ("x",),
        "--data": ("x",),
        "--block": ("x",),
        "--layout": ("x",),
        "--model": ("repvgg_z9", ""),
        "--opt": ("adam", ""),
        "--sched": ("linear",),
        "--augment": ("augmix",),
        "--interpolation": ("lanczos",),
        "--best-metric": ("top5",),
    },
    "quantize": {"--data": ("x",), "--weights": ("x",), "--device": BAD_DEVICES},
    "optimize": {
        "--precision": ("x", "fp16", ""),
        "--backend": ("x",),
        "--data": ("x",),
        "--device": BAD_DEVICES,
    },
    "ablate": {
        "--data": ("x",),
        "--model": ("repvgg_z9",),
        "--variants": ("foo",),
        "--device": BAD_DEVICES,
    },
    "train-seg": {
        "--data": ("x",),
        "--model": ("repvgg_z9",),
        "--output-stride": ("5", "x"),
        "--dilation-mode": ("x",),
        "--device": BAD_DEVICES,
    },
    "export": {"--to": ("x", "")},
    "convert": {"--format": ("x",)},
    "models": {"--format": ("x",)},
    "demo": {"--backend": ("x",), "--model": ("repvgg_z9",), "--device": BAD_DEVICES},
}

CUDA_ONLY = {  # right on a GPU machine, a mistake on this one
    "eval": [("--device", "cuda"), ("--device", "cuda:7")],
    "predict": [("--device", "cuda")],
    "bench": [("--device", "cuda")],
    "train": [("--device", "cuda"), ("--amp", "fp16")],
    "train-seg": [("--device", "cuda")],
    "optimize": [("--device", "cuda")],
    "ablate": [("--device", "cuda")],
    "demo": [("--device", "cuda")],
}

EDITED_RECORDS: dict[str, dict[str, object]] = {  # the record of a good file, edited: never trusted
    "record_unknown_name": {"model_name": "repvgg_z9"},
    "record_other_variant": {"model_name": "repvgg_b0"},
    "record_other_blocks": {"config": {"num_blocks": [1, 1, 3, 1]}},
    "record_other_widths": {"config": {"width_multiplier": [0.5, 0.5, 0.5, 1.0]}},
    "record_huge_blocks": {"config": {"num_blocks": [1, 1, 10**8, 1]}},
    "record_huge_widths": {"config": {"width_multiplier": [10**5, 1, 1, 1]}},
    "record_huge_classes": {"config": {"num_classes": 10**12}},
    "record_huge_image_size": {
        "preprocessing": {"image_size": 10**9, "resize": 10**9, "mean": [0.3], "std": [0.3]}
    },
}
RECORD_SLOTS = args("eval predict convert verify export quantize optimize bench")  # they build the record's

BAD_CHECKPOINTS = args(
    "missing folder empty text truncated bitflip huge_header nan_weights png0 timm_partial random_tensors "
    "pickle_class pickle_exploit torch_truncated"
)
CHECKPOINT_SLOTS: dict[str, tuple[str, ...]] = {  # where a checkpoint goes: {x} is the bad one
    "eval": args("eval {x} --data-dir {data} --val-subset 16 --batch-size 16"),
    "predict": args("predict {x} {png0}"),
    "convert": args("convert {x} {tmp}/out.safetensors"),
    "verify": args("verify {x}"),
    "verify-deploy": args("verify {ckpt} {x}"),
    "export": args("export {x} --to torchscript {tmp}/model.pt"),
    "quantize": args("quantize {x} {tmp}/q.safetensors --data-dir {data} --calib 8 --no-progress"),
    "optimize": args("optimize {x} {tmp}/o.safetensors --data-dir {data} --val-subset 16 --calib 8"),
    "bench": (*BASE["bench"][:-1], "{x}"),
    "train-init": (*BASE["train"], "--init", "{x}"),
    "train-seg-backbone": (*BASE["train-seg"], "--backbone-weights", "{x}"),
}

WRONG_KIND: dict[str, tuple[str, ...]] = {  # a readable checkpoint that is not the one needed
    "convert-int8": args("convert {int8} {tmp}/out.safetensors"),
    "convert-deploy": args("convert {deploy} {tmp}/out.safetensors"),
    "export-int8": args("export {int8} --to torchscript {tmp}/model.pt"),
    "export-int8-onnx": args("export {int8} --to onnx {tmp}/model.onnx"),
    "verify-int8": args("verify {int8}"),
    "verify-deploy-as-train": args("verify {deploy}"),
    "verify-int8-as-deploy": args("verify {ckpt} {int8}"),
    "verify-train-as-deploy": args("verify {ckpt} {ckpt}"),
    "verify-other-architecture": args("verify {ckpt} {other_deploy}"),
    "verify-pair-swapped": args("verify {deploy} {ckpt}"),
    "quantize-int8": args("quantize {int8} {tmp}/q.safetensors --data-dir {data} --calib 8 --no-progress"),
    "train-init-deploy": (*BASE["train"], "--init", "{deploy}"),
    "train-init-int8": (*BASE["train"], "--init", "{int8}"),
    "train-init-other-architecture": (*BASE["train"], "--init", "{ckpt}"),  # the small model into A0
    "train-seg-backbone-int8": (*BASE["train-seg"], "--backbone-weights", "{int8}"),
    "eval-int8-amp": args("eval {int8} --data-dir {data} --val-subset 16 --amp bf16"),
    "eval-wrong-dataset": args("eval {ckpt} --data cifar10 --data-dir {data}"),
    "quantize-wrong-dataset": args("quantize {ckpt} {tmp}/q.safetensors --data cifar10 --data-dir {data}"),
    "eval-image-size-too-small-for-model": (*BASE["eval"], "--image-size", "1"),
    "predict-3-channel-preprocessing": (*BASE["predict"], "--preprocessing", "cifar10"),
}

COMBINATIONS: dict[str, tuple[str, ...]] = {  # values each fine alone, wrong together or here
    "train-resume-nothing-to-resume": (*BASE["train"], "--resume"),
    "train-batch-above-subset": (*BASE["train"], "--batch-size", "64"),
    "train-nesterov-with-adamw": (*BASE["train"], *args("--opt adamw --nesterov")),
    "train-decay-rate-without-step": (*BASE["train"], *args("--decay-rate 0.5")),
    "train-magnitude-without-randaugment": (*BASE["train"], *args("--augment-magnitude 3")),
    "train-switch-without-cutmix": (*BASE["train"], *args("--mixup 0.2 --mixup-switch-prob 0.2")),
    "train-min-lr-above-lr": (*BASE["train"], *args("--lr 0.01 --min-lr 0.1")),
    "train-accum-above-batches": (*BASE["train"], *args("--accum-steps 8")),
    "train-shards-without-data-dir": args("train --data shards --output {tmp}/run --no-progress"),
    "train-shards-with-subset": args(
        "train --data shards --data-dir {shards} --train-subset 4 --output {tmp}/r"
    ),
    "train-shards-of-idx-files": args(
        "train --data shards --data-dir {data} --output {tmp}/run --no-progress"
    ),
    "train-hf-of-idx-files": args("train --data hf --data-dir {data} --output {tmp}/run --no-progress"),
    "train-shards-batch-above-share": args(
        "train --data shards --data-dir {shards} --batch-size 64 --output {tmp}/run --no-progress"
    ),
    "shard-source-without-splits": args("shard {data} {tmp}/shards"),
    "shard-over-shards": args("shard {images} {shards}"),
    "shard-missing-source": args("shard {missing} {tmp}/shards"),
    "train-image-size-not-native": (*BASE["train"], "--image-size", "9"),
    "eval-image-size-not-native": (*BASE["eval"], "--image-size", "4096"),
    "eval-imagefolder-without-data-dir": args("eval {ckpt} --data imagefolder"),
    "eval-imagefolder-of-idx-files": args("eval {ckpt} --data imagefolder --data-dir {data}"),
    "train-seg-folder-without-num-classes": (*BASE["train-seg"], "--data", "folder"),
    "train-seg-folder-empty": (
        *BASE["train-seg"],
        *args("--data folder --data-dir {data_empty} --num-classes 3 --image-size 32"),
    ),
    "ablate-one-unknown-variant": (*BASE["ablate"], "--variants", "repvgg", "repvgg_z9"),
    "export-name-without-format": args("export {ckpt} {tmp}/model.txt"),
    "export-onnx-to-a-torchscript-name": args("export {ckpt} --to onnx {tmp}/model.pt"),
    "export-torchscript-to-an-onnx-name": args("export {ckpt} --to torchscript {tmp}/model.onnx"),
    "quantize-on-cuda": (*BASE["quantize"], "--device", "cuda"),
    "train-one-class-imagefolder": (*BASE["train"], *args("--data imagefolder --data-dir {one_class}")),
    "eval-one-class-imagefolder": (*BASE["eval"], *args("--data imagefolder --data-dir {one_class}")),
    "train-resume-with-config": (*BASE["train"], "--resume", "--config", "{cfg_good}"),
    "train-resume-and-overwrite": (*BASE["train"], "--resume", "--overwrite"),
    "train-seg-resume-nothing-to-resume": (*BASE["train-seg"], "--resume"),
    "train-seg-resume-with-config": (*BASE["train-seg"], "--resume", "--config", "{cfg_good}"),
    "train-seg-resume-and-overwrite": (*BASE["train-seg"], "--resume", "--overwrite"),
    "train-seg-image-size-of-fashion-mnist-seg": (*BASE["train-seg"], "--image-size", "64"),
    "train-seg-num-classes-of-fashion-mnist-seg": (*BASE["train-seg"], "--num-classes", "5"),
}

IN = {"in.safetensors": "ckpt"}  # the checkpoint copied into the case's folder first
OUTPUTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {  # id -> argv, copies into {tmp}
    "convert-parent-is-file": (args("convert {ckpt} {text}/out.safetensors"), {}),
    "convert-into-folder": (args("convert {ckpt} {folder}"), {}),
    "convert-onto-input": (args("convert {tmp}/in.safetensors {tmp}/in.safetensors"), IN),
    "convert-onto-input-relative": (args("convert {tmp}/in.safetensors ./in.safetensors"), IN),
    "export-parent-is-file": (args("export {ckpt} --to onnx {text}/model.onnx"), {}),
    "export-into-folder": (args("export {ckpt} --to torchscript {folder}"), {}),
    "export-onto-input": (args("export {tmp}/in.safetensors --to torchscript {tmp}/in.safetensors"), IN),
    "quantize-parent-is-file": (args("quantize {ckpt} {text}/q.safetensors --data-dir {data} --calib 8"), {}),
    "quantize-into-folder": (args("quantize {ckpt} {folder} --data-dir {data} --calib 8"), {}),
    "quantize-onto-input": (
        args("quantize {tmp}/in.safetensors {tmp}/in.safetensors --data-dir {data} --calib 8"),
        IN,
    ),
    "train-output-is-file": ((*BASE["train"], "--output", "{text}"), {}),
    "train-output-parent-is-file": ((*BASE["train"], "--output", "{text}/run"), {}),
    "train-seg-output-is-file": ((*BASE["train-seg"], "--output", "{text}"), {}),
    "ablate-output-is-file": ((*BASE["ablate"], "--output", "{text}"), {}),
    "bench-output-is-file": ((*BASE["bench"], "--output", "{text}"), {}),
    "demo-output-is-file": ((*BASE["demo"], "--output", "{text}"), {}),
    "predict-pspnet-mask-exists": (
        args("predict {pspnet} {png0} --output {tmp}"),
        {"image0_mask.png": "png0"},
    ),
    "predict-pspnet-masks-into-a-file": (args("predict {pspnet} {png0} --output {text}"), {}),
}

CONFIGS = args(
    "cfg_missing cfg_invalid cfg_list cfg_string cfg_types cfg_unknown cfg_null cfg_bool cfg_range "
    "cfg_nested cfg_empty png0 folder"
)

BAD_DATA_DIRS = args("data_missing data_empty text data_corrupt data_truncated data_mismatch data_bad_label")
DATA_DIR_COMMANDS = args("eval quantize train train-seg ablate demo")

BAD_IMAGES = args("missing text empty ckpt truncated")  # predict skips them, says so, exits 1

ARGPARSE: dict[str, tuple[str, ...]] = {
    "no-command": (),
    "unknown-command": args("frobnicate"),
    "eval-no-checkpoint": args("eval"),
    "convert-no-output": args("convert {ckpt}"),
    "export-two-outputs": args("export {ckpt} {tmp}/a.onnx --output {tmp}/b.onnx"),
    "quantize-no-output": args("quantize {ckpt} --data-dir {data}"),
    "predict-no-images": args("predict {ckpt}"),
    "eval-unknown-option": (*BASE["eval"], "--frobnicate"),
    "verify-three-checkpoints": args("verify {ckpt} {deploy} {deploy}"),
    "train-strides-too-few": (*BASE["train"], *args("--strides 1 2")),
    "train-strides-not-numbers": (*BASE["train"], *args("--strides a b c d e")),
    "train-strides-not-1-or-2": (*BASE["train"], *args("--strides 3 3 3 3 3")),
    "train-finetune-without-init": (*BASE["train"], "--finetune"),
    "train-custom-l2-plain-block": (*BASE["train"], *args("--custom-l2 --block plain")),
}


def _cases() -> Iterator[Case]:
    for command, options in NUMERIC.items():
        for option, values in options.items():
            for value in values:
                yield Case(f"{command}-{option[2:]}-{value or 'empty'}", (*BASE[command], option, value))
    for command, options in CHOICES.items():
        for option, values in options.items():
            for value in values:
                yield Case(f"{command}-{option[2:]}-{value or 'empty'}", (*BASE[command], option, value))
    for command, pairs in CUDA_ONLY.items():
        for option, value in pairs:
            skip = "a CUDA GPU is available here" if CUDA else None
            argv = (*BASE[command], option, value)
            yield Case(f"{command}-{option[2:]}-{value}-without-gpu", argv, skip=skip)
    for slot, template in CHECKPOINT_SLOTS.items():
        for bad in BAD_CHECKPOINTS:
            if (slot, bad) == ("bench", "nan_weights"):
                continue  # timing does not look at the values
            yield Case(f"checkpoint-{slot}-{bad}", tuple(t.replace("{x}", "{" + bad + "}") for t in template))
        for bad in EDITED_RECORDS if slot in RECORD_SLOTS else ():
            yield Case(f"checkpoint-{slot}-{bad}", tuple(t.replace("{x}", "{" + bad + "}") for t in template))
    for group, table in (("wrong-kind", WRONG_KIND), ("combination", COMBINATIONS), ("argparse", ARGPARSE)):
        for name, argv in table.items():
            yield Case(f"{group}-{name}", argv)
    for name, (argv, copies) in OUTPUTS.items():
        yield Case(f"output-{name}", argv, copies=copies)
    for command in ("train", "train-seg"):
        for config in CONFIGS:
            name = f"config-{config}" if command == "train" else f"config-{command}-{config}"
            yield Case(name, (*BASE[command], "--config", "{" + config + "}"))
    for command in DATA_DIR_COMMANDS:
        for bad in BAD_DATA_DIRS:
            yield Case(f"data-dir-{command}-{bad}", (*BASE[command], "--data-dir", "{" + bad + "}"))
    for bad in BAD_IMAGES:
        yield Case(f"image-{bad}", (*BASE["predict"], "{" + bad + "}"), code=1)
    yield Case("image-folder-without-images", (*BASE["predict"], "{folder}"))  # searched: none there
    yield Case("image-pattern-matching-nothing", (*BASE["predict"], "{tmp}/nothing-*.png"))


def _param(case: Case) -> object:
    marks: list[pytest.MarkDecorator] = []
    if case.skip:
        marks.append(pytest.mark.skip(reason=case.skip))
    return pytest.param(case, id=case.id, marks=marks)


CASES = [_param(case) for case in _cases()]


def _snapshot(*roots: Path) -> dict[str, str]:
    """The SHA-256 of every file under ``roots``."""
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for root in roots
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_error_line_and_changes_no_file(
    case: Case,
    assets: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # relative default outputs (runs/...) land here
    for name, asset in case.copies.items():
        shutil.copyfile(assets[asset], tmp_path / name)
    names = {key: str(path) for key, path in assets.items()} | {"tmp": str(tmp_path)}
    argv = [token.format_map(names) for token in case.argv]
    before = _snapshot(assets["root"], tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse: usage and one error line
        code = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    prefix = f"repvgg {argv[0]}: error: " if argv and argv[0] in COMMANDS else "repvgg: error: "
    assert lines and lines[-1].startswith(prefix), err
    if not lines[0].startswith("usage:"):  # a library error: one line saying it
        assert sum("error:" in line for line in lines) == (1 if case.code == 2 else len(lines)), err
    assert code == case.code, err
    after = _snapshot(assets["root"], tmp_path)
    assert {path: after.get(path) for path in before} == before, "a file that existed before was changed"
    assert not assets["marker"].exists(), "a pickle was executed"


def test_there_are_hundreds_of_cases() -> None:
    assert len(CASES) >= 300
