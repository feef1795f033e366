"""The configuration of a training run: every field, its default, its choices and its help, in one place.

Plain data without torch: the command line builds its ``train`` flags from these fields. Each field's
``metadata`` holds what the command line needs besides the field's name, type and default:

``help``
    one line; it names other parameters in backticks (`init`), which the command line shows as flags.
``default``
    how the help shows the default, where the field's value alone does not say it (``None``, a switch).
``flag``
    the flag's name without its dashes, where it is not the field's name with dashes (``ema_decay``:
    ``ema``). A bool field is a switch that sets True, or False (``no-progress``) when it defaults to True.
``choices``, ``nargs``
    as argparse's; a ``list[int]`` field takes ``nargs`` values (one or more when not given).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repvgg.core.designs import BLOCK_DESIGNS, block_design
from repvgg.exceptions import TrainingError

AMP_CHOICES = ("none", "bf16", "fp16")
DATASETS = ("fashion-mnist", "cifar10", "imagefolder")
#: RepVGG, and the residual baseline of repvgg.studies.ablation (its LAYOUT_VARIANTS; a test keeps them equal)
LAYOUTS = ("repvgg", "residual_reorg")


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` in the output folder."""

    model: str = field(default="repvgg_a0", metadata={"help": "model name, as repvgg models lists them"})
    block: str = field(
        default="repvgg",
        metadata={
            "help": "training-time block design (qarepvgg quantizes well)",
            "choices": tuple(BLOCK_DESIGNS),
        },
    )
    layout: str = field(
        default="repvgg",
        metadata={
            "help": "residual_reorg: the paper's ResNet-like baseline (no deploy form)",
            "choices": LAYOUTS,
        },
    )
    data: str = field(
        default="fashion-mnist",
        metadata={
            "help": "dataset; fashion-mnist comes from the Debian package dataset-fashion-mnist",
            "choices": DATASETS,
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "where the dataset lies",
            "default": "the Debian package's folder, for fashion-mnist",
        },
    )
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "images per step, per process"})
    lr: float | None = field(
        default=None,
        metadata={"help": "peak learning rate (cosine schedule)", "default": "0.1 x global batch / 256"},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum", "default": "off"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay, with the authors' exclusions"})
    custom_l2: bool = field(
        default=False, metadata={"help": "the authors' custom L2 on branch kernels", "default": "off"}
    )
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear learning-rate warm-up, in epochs"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy"})
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha, 0 for none"})
    autoaugment: bool = field(
        default=False, metadata={"help": "AutoAugment on the training images", "default": "off"}
    )
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "keep an EMA of the weights with this decay, e.g. 0.9998",
            "flag": "ema",
            "default": "no EMA",
        },
    )
    amp: str = field(
        default="none",
        metadata={"help": "mixed precision: bf16 on CPU; fp16 or bf16 on CUDA", "choices": AMP_CHOICES},
    )
    channels_last: bool = field(
        default=False, metadata={"help": "channels-last memory format", "default": "off"}
    )
    grad_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations to save memory", "default": "off"}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "training image size", "default": "the dataset's native size"}
    )
    strides: list[int] | None = field(
        default=None,
        metadata={
            "help": "strides of stages 0-4",
            "nargs": 5,
            "default": "the paper's, adapted to small images",
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    workers: int | None = field(
        default=None,
        metadata={"help": "data-loading processes", "default": "0 for in-memory datasets, else up to 8"},
    )
    train_subset: int | None = field(
        default=None, metadata={"help": "train on this many images", "default": "all"}
    )
    val_subset: int | None = field(
        default=None, metadata={"help": "evaluate on this many images", "default": "all"}
    )
    output: str = field(default="runs/train", metadata={"help": "run folder", "default": "runs/MODEL-DATA"})
    init: str | None = field(
        default=None, metadata={"help": "start from this training-form checkpoint", "default": "none"}
    )
    finetune: bool = field(
        default=False, metadata={"help": "with `init`: replace its classifier head", "default": "off"}
    )
    sync_bn: bool = field(
        default=False, metadata={"help": "SyncBatchNorm across processes, on CUDA", "default": "off"}
    )
    skip_bad_images: bool = field(
        default=False, metadata={"help": "skip and count unreadable images", "default": "off"}
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu or cuda", "default": "cuda when available"}
    )
    progress: bool = field(
        default=True,
        metadata={"help": "no progress bar", "flag": "no-progress", "default": "a progress bar"},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace a run already in the `output` folder, starting afresh", "default": "off"},
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"Unknown configuration keys {', '.join(unknown)}: check the `config` file.")
        return cls(**values)

    def validate(self) -> None:
        if self.amp not in AMP_CHOICES:
            raise TrainingError(f"`amp` must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("`epochs` and `batch_size` must be at least 1.")
        design = block_design(self.block)
        if self.custom_l2 and not (design.dense == "bn" and design.one_by_one == "bn" and design.convertible):
            raise TrainingError(
                f"`custom_l2` needs 3x3 and 1x1 branches that end in BatchNorm; the {self.block!r} block "
                "has not, so drop `custom_l2` (it trains with plain weight decay)."
            )
        if self.finetune and not self.init:
            raise TrainingError(
                "`finetune` replaces the head of the `init` checkpoint; give `init` a checkpoint too."
            )


def load_run_config(path: str | Path) -> dict[str, Any]:
    """A saved or hand-written configuration file (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"No configuration file at {path}: check the path.")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TrainingError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(values, dict):
        raise TrainingError(f"{path} must hold a JSON object of configuration keys.")
    return values
