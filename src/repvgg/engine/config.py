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
``aliases``
    other flag names (without dashes) for the field, e.g. timm's ``pretrained`` for ``init``.
``choices``, ``nargs``
    as argparse's; a ``list[int]`` field takes ``nargs`` values (one or more when not given).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from repvgg.core.designs import BLOCK_DESIGNS, block_design
from repvgg.exceptions import TrainingError
from repvgg.runtime.names import DEVICE_PATTERN

AMP_CHOICES = ("none", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw", "lamb", "lars")  # lamb and lars are timm's (repvgg[train])
SCHEDULES = ("cosine", "step", "poly", "onecycle")
#: torchvision v2's AutoAugment (the dataset's policy), RandAugment, TrivialAugmentWide
AUGMENT_POLICIES = ("none", "autoaugment", "randaugment", "trivialaugment")
INTERPOLATIONS = ("bilinear", "bicubic")
BEST_METRICS = ("top1", "loss")
#: shards: WebDataset tar shards written by ``repvgg shard``; hf: a Hugging Face dataset saved to disk or
#: Parquet files (``hf-stream`` reads the Parquet files as a stream)
DATASETS = ("fashion-mnist", "cifar10", "imagefolder", "shards", "hf", "hf-stream")
SEG_DATASETS = ("fashion-mnist-seg", "folder")  # segmentation sets (repvgg.engine.segmentation_data)
#: RepVGG, and the residual baseline of repvgg.studies.ablation (its LAYOUT_VARIANTS)
LAYOUTS = ("repvgg", "residual_reorg")
#: Fields that may change when a run is resumed: ``epochs`` extends (or shortens) the schedule; the others
#: do not change what is computed. Every other field must be the run's own.
RESUMABLE_CHANGES = (
    "epochs",
    "workers",
    "device",
    "progress",
    "log_interval",
    "channels_last",
    "data_dir",
    "output",
    "overwrite",
)
#: Never saved in ``config.json``: how a run was started, not what it is.
NOT_SAVED = ("overwrite",)

#: Inclusive ranges of numeric fields (None: unbounded); those in :data:`POSITIVE` must also be above 0.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "epochs": (1, None),
    "batch_size": (1, None),
    "lr": (0, None),
    "momentum": (0, 1),
    "weight_decay": (0, None),
    "warmup_epochs": (0, None),
    "label_smoothing": (0, 1),
    "mixup": (0, None),
    "ema_decay": (0, 1),
    "min_lr": (0, None),
    "decay_epochs": (0, None),
    "decay_rate": (0, 1),
    "poly_power": (0, None),
    "clip_grad": (0, None),
    "accum_steps": (1, 1024),
    "cutmix": (0, None),
    "mixup_prob": (0, 1),
    "mixup_switch_prob": (0, 1),
    "augment_magnitude": (0, 30),
    "random_erasing": (0, 1),
    "drop_path": (0, 0.99),
    "crop_pct": (0.05, 1),
    "keep_best": (1, 100),
    "patience": (1, None),
    "image_size": (8, 4096),
    "seed": (0, 2**63 - 1),
    "workers": (0, 256),
    "frozen_stages": (-1, 4),
    "head_lr_mult": (0, None),
    "log_interval": (0, None),
    "train_subset": (1, None),
    "val_subset": (1, None),
}
POSITIVE = ("lr", "ema_decay", "head_lr_mult", "decay_epochs", "decay_rate", "clip_grad", "poly_power")


#: The fields every run's configuration has alike: default and command-line metadata (see the module's doc).
RUN_FIELDS: dict[str, tuple[Any, dict[str, Any]]] = {
    "progress": (True, {"help": "no progress bar", "flag": "no-progress", "default": "a progress bar"}),
    "log_interval": (
        50,
        {
            "help": "without a progress bar (`progress`, or output not a terminal): a line every this many "
            "steps, 0 for none"
        },
    ),
    "overwrite": (
        False,
        {"help": "replace a run already in the `output` folder, starting afresh", "default": "off"},
    ),
}


def run_field(name: str) -> Any:
    """The dataclass field ``name`` of :data:`RUN_FIELDS`, for each run configuration that has it."""
    default, metadata = RUN_FIELDS[name]
    return field(default=default, metadata=metadata)


class RunConfig:
    """What every run's configuration shares (:class:`TrainConfig`, :class:`SegTrainConfig`): reading it
    from a ``config.json`` (unknown keys and wrong types refused), what is saved, the checks of its values
    (the class's :attr:`RANGES`, :attr:`POSITIVE` and each field's ``choices``), and the one rule of
    resuming: every saved value stays the run's own except those in :attr:`RESUMABLE`."""

    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {}
    POSITIVE: ClassVar[tuple[str, ...]] = ()
    RESUMABLE: ClassVar[tuple[str, ...]] = RESUMABLE_CHANGES

    @classmethod
    def from_dict(cls: type[Config], values: dict[str, Any]) -> Config:
        """A configuration from a mapping (a ``config.json``); unknown keys and wrong types are refused."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"Unknown configuration keys {', '.join(unknown)}: check the `config` file.")
        config = cls(**values)
        config.check_types()
        return config

    @classmethod
    def default_output(cls, values: dict[str, Any]) -> str:
        """The run folder when none is given."""
        return next(f.default for f in dataclasses.fields(cls) if f.name == "output")  # type: ignore[arg-type]

    def as_saved(self) -> dict[str, Any]:
        """What ``config.json`` holds: every field but those in :data:`NOT_SAVED`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_SAVED}  # type: ignore[call-overload]

    def check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if not _has_type(value, hints[item.name]):
                hint = hints[item.name]
                kind = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
                kind = kind or str(hint).replace("NoneType", "None").replace("typing.", "")
                raise TrainingError(f"`{item.name}` must be of type {kind}, got {value!r}.")

    def check_values(self) -> None:
        """Types, the ranges of numbers, the choices of fields that have them, and the device's form."""
        self.check_types()
        for name, (low, high) in self.RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            too_low = (low is not None and value < low) or (name in self.POSITIVE and value <= 0)
            if not math.isfinite(value) or too_low or (high is not None and value > high):
                bounds = f"{'above' if name in self.POSITIVE else 'at least'} {low}"
                bounds += f" and at most {high}" if high is not None else ""
                raise TrainingError(f"`{name}` must be {bounds}, got {value}.")
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            choices = item.metadata.get("choices")
            value = getattr(self, item.name)
            if choices is not None and value is not None and value not in choices:
                raise TrainingError(
                    f"`{item.name}` must be one of {', '.join(map(str, choices))}, got {value!r}."
                )
        device = getattr(self, "device", None)
        if device is not None and not DEVICE_PATTERN.fullmatch(device):
            raise TrainingError(f"`device` must be cpu, cuda or cuda:N, got {device!r}.")

    def validate(self) -> None:
        """Every value checked before any work starts."""
        self.check_values()

    def changes_from(self, saved: dict[str, Any]) -> list[str]:
        """The fields that differ from a saved run's ``config.json`` and may not change on resume (a value
        left to the run, None, takes the run's own)."""
        current = self.as_saved()
        return [
            k
            for k in current
            if k not in self.RESUMABLE and k in saved and current[k] is not None and saved[k] != current[k]
        ]

    def resumed(self: Config, saved: dict[str, Any]) -> Config:
        """This configuration continuing the saved run: changes outside :attr:`RESUMABLE` refused in one
        sentence, values left to the run (None) taken from ``saved``."""
        changed = self.changes_from(saved)
        if changed:
            names = ", ".join(f"`{name}` ({saved[name]!r} -> {getattr(self, name)!r})" for name in changed)
            raise TrainingError(
                f"Resuming cannot change {names}: the saved state was trained with the run's own values; "
                "drop those options, or start a new run from the checkpoint (`init`)."
            )
        left_to_the_run = {k: saved[k] for k in saved if hasattr(self, k) and getattr(self, k) is None}
        return dataclasses.replace(self, **left_to_the_run)  # type: ignore[type-var]


Config = typing.TypeVar("Config", bound=RunConfig)


@dataclass
class TrainConfig(RunConfig):
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
    opt: str = field(
        default="sgd",
        metadata={
            "help": "optimizer: SGD (the paper's), AdamW, or timm's LAMB or LARS for large batches",
            "choices": OPTIMIZERS,
        },
    )
    lr: float | None = field(
        default=None,
        metadata={
            "help": "peak learning rate",
            "default": "the optimizer's rule: sgd/lars 0.1 x effective batch / 256, adamw 5e-4 x effective "
            "batch / 512, lamb 5e-3 x effective batch / 2048",
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD and LARS momentum"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum (SGD)", "default": "off"})
    weight_decay: float = field(
        default=1e-4,
        metadata={"help": "weight decay (decoupled for AdamW/LAMB), with the authors' exclusions"},
    )
    custom_l2: bool = field(
        default=False, metadata={"help": "the authors' custom L2 on branch kernels", "default": "off"}
    )
    sched: str = field(
        default="cosine",
        metadata={
            "help": "learning-rate schedule per step: cosine, step (`decay_rate` every `decay_epochs`), poly "
            "(`poly_power`) or one-cycle (its rise is the warm-up, 30% of training unless `warmup_epochs`)",
            "choices": SCHEDULES,
        },
    )
    min_lr: float = field(default=0.0, metadata={"help": "the schedule's lowest learning rate"})
    decay_epochs: float = field(default=30.0, metadata={"help": "step schedule: epochs between decays"})
    decay_rate: float = field(default=0.1, metadata={"help": "step schedule: factor at each decay"})
    poly_power: float = field(default=0.9, metadata={"help": "poly schedule: the power of (1 - progress)"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear learning-rate warm-up, in epochs"})
    clip_grad: float | None = field(
        default=None,
        metadata={
            "help": "clip the gradients' global norm to this (before the optimizer step)",
            "default": "off",
        },
    )
    accum_steps: int = field(
        default=1,
        metadata={
            "help": "accumulate gradients over this many batches per optimizer step (effective batch = "
            "`batch_size` x processes x this)"
        },
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy"})
    mixup: float = field(default=0.0, metadata={"help": "MixUp alpha, 0 for none"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha, 0 for none"})
    mixup_prob: float = field(
        default=1.0, metadata={"help": "with `mixup` or `cutmix`: the share of batches that are mixed"}
    )
    mixup_switch_prob: float = field(
        default=0.5,
        metadata={"help": "with both `mixup` and `cutmix`: the share of mixed batches that use CutMix"},
    )
    augment: str = field(
        default="none",
        metadata={
            "help": "augmentation policy after crop and flip (torchvision's AutoAugment, RandAugment, "
            "TrivialAugmentWide)",
            "choices": AUGMENT_POLICIES,
        },
    )
    augment_magnitude: int = field(default=9, metadata={"help": "RandAugment's magnitude (0-30)"})
    random_erasing: float = field(
        default=0.0,
        metadata={
            "help": "probability of erasing a random rectangle of a training image",
            "aliases": ("reprob",),
        },
    )
    drop_path: float = field(
        default=0.0,
        metadata={
            "help": "stochastic depth rate of the last block (rising from 0), in blocks with an identity "
            "branch; training only, so conversion stays exact",
            "aliases": ("drop-path-rate",),
        },
    )
    repopt_scales: str | None = field(
        default=None,
        metadata={
            "help": "with `block` repopt, the branch scales its gradient multipliers stand for: paper "
            "(RepOpt-VGG's constants, sqrt(2/i) for the conv branches of a stage's i-th block), unit "
            "(all 1), or the checkpoint of an `online` run of the same model, whose learned scales are "
            "taken (the paper's hyper-search)",
            "default": "paper",
        },
    )
    crop_pct: float | None = field(
        default=None,
        metadata={
            "help": "evaluation crop ratio: resize the shorter side to size / this, centre crop; recorded "
            "in the checkpoint",
            "default": "0.875 for image folders and shards, 1 for Fashion-MNIST/CIFAR-10",
        },
    )
    interpolation: str = field(
        default="bilinear",
        metadata={
            "help": "resizing of training crops and evaluation images; recorded",
            "choices": INTERPOLATIONS,
        },
    )
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "keep an EMA of the weights with this decay, e.g. 0.9998",
            "flag": "ema",
            "default": "no EMA",
        },
    )
    keep_best: int = field(
        default=1,
        metadata={
            "help": "keep the best this many checkpoints by `best_metric` (of the EMA weights when `ema`); "
            "the best is best_train.safetensors, converted to best_deploy.safetensors at the end"
        },
    )
    best_metric: str = field(
        default="top1",
        metadata={
            "help": "the validation metric that ranks checkpoints (loss: lower is better)",
            "choices": BEST_METRICS,
        },
    )
    patience: int | None = field(
        default=None,
        metadata={
            "help": "stop early after this many epochs without a better `best_metric`",
            "default": "off",
        },
    )
    amp: str = field(
        default="none",
        metadata={"help": "mixed precision: bf16 on CPU; fp16 or bf16 on CUDA", "choices": AMP_CHOICES},
    )
    channels_last: bool = field(
        default=True,
        metadata={
            "help": "channels-last memory format: the same computation, faster convolutions",
            "default": "on",
            "negatable": True,
        },
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
        default=None,
        metadata={
            "help": "start from this training-form checkpoint: one of this package's, or the authors', "
            "timm's or mmpretrain's (ImageNet) file; its stem is adapted to the data's channels",
            "default": "none",
            "aliases": ("pretrained",),
        },
    )
    finetune: bool = field(
        default=False,
        metadata={
            "help": "with `init`: replace its classifier head for the data's classes",
            "default": "off",
        },
    )
    frozen_stages: int = field(
        default=-1,
        metadata={
            "help": "freeze stages 0 to this one (no gradients, BatchNorm statistics kept), as mmpretrain's "
            "frozen_stages; -1 freezes none",
            "flag": "freeze-stages",
        },
    )
    head_lr_mult: float = field(
        default=1.0,
        metadata={
            "help": "the classifier head's learning rate is `lr` times this (e.g. 10 when fine-tuning)"
        },
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
    progress: bool = run_field("progress")
    log_interval: int = run_field("log_interval")
    overwrite: bool = run_field("overwrite")

    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = RANGES
    POSITIVE: ClassVar[tuple[str, ...]] = POSITIVE

    @classmethod
    def default_output(cls, values: dict[str, Any]) -> str:
        return f"runs/{values.get('model', 'repvgg_a0')}-{values.get('data', 'fashion-mnist')}"

    def validate(self) -> None:
        """Every value checked before any work starts: types, ranges, choices, combinations."""
        self.check_values()
        if self.strides is not None and (
            len(self.strides) != 5 or any(s not in (1, 2) for s in self.strides)
        ):
            raise TrainingError(
                f"`strides` must give 1 or 2 for each of the five stages, got {self.strides}."
            )
        design = block_design(self.block)
        if self.custom_l2 and not (design.dense == "bn" and design.one_by_one == "bn" and design.convertible):
            raise TrainingError(
                f"`custom_l2` needs 3x3 and 1x1 branches that end in BatchNorm; the {self.block!r} block "
                "has not, so drop `custom_l2` (it trains with plain weight decay)."
            )
        self._check_combinations()
        if self.finetune and not self.init:
            raise TrainingError(
                "`finetune` replaces the head of the `init` checkpoint; give `init` a checkpoint too."
            )

    def _check_combinations(self) -> None:
        """An option the rest of the configuration would ignore is refused: it would not do what it says."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        used_by = {
            "nesterov": (self.opt == "sgd", "`opt` sgd"),
            "momentum": (self.opt in ("sgd", "lars"), "`opt` sgd or lars"),
            "decay_epochs": (self.sched == "step", "`sched` step"),
            "decay_rate": (self.sched == "step", "`sched` step"),
            "poly_power": (self.sched == "poly", "`sched` poly"),
            "augment_magnitude": (self.augment == "randaugment", "`augment` randaugment"),
            "mixup_prob": (self.mixup > 0 or self.cutmix > 0, "`mixup` or `cutmix`"),
            "mixup_switch_prob": (self.mixup > 0 and self.cutmix > 0, "both `mixup` and `cutmix`"),
        }
        for name, (used, needs) in used_by.items():
            if not used and getattr(self, name) != defaults[name]:
                raise TrainingError(f"`{name}` acts only with {needs}; drop it or set that too.")
        if self.drop_path > 0 and self.layout != "repvgg":
            raise TrainingError(
                f"`drop_path` acts in RepVGG blocks; the {self.layout!r} layout has none, so drop it."
            )
        if self.repopt_scales and not block_design(self.block).gradient_multipliers:
            raise TrainingError(
                f"`repopt_scales` sets the gradient multipliers of `repopt` blocks; the {self.block!r} block "
                "has none, so drop it (or train `block` repopt)."
            )
        if self.drop_path > 0 and block_design(self.block).identity is None:
            raise TrainingError(
                f"`drop_path` drops the branches beside a block's identity branch; the {self.block!r} block "
                "has no separate identity branch, so drop `drop_path` (or train another block)."
            )


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON-loaded ``value`` fits a field's annotation (``int`` for a float field is fine)."""
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def load_run_config(path: str | Path, *, saved_run: bool = False) -> dict[str, Any]:
    """A saved or hand-written configuration file (JSON), without :data:`NOT_SAVED` keys (an earlier
    release saved ``overwrite``: repeating such a run must not replace another without being asked).
    ``saved_run``: the run folder's own ``config.json`` (resuming), where a key that an earlier release did
    not write takes the value that release used."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"No configuration file at {path}: check the path.")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise TrainingError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(values, dict):
        raise TrainingError(f"{path} must hold a JSON object of configuration keys.")
    if "autoaugment" in values:  # an earlier release's switch, now one of the `augment` policies
        values["augment"] = (
            "autoaugment" if values.pop("autoaugment") is True else values.get("augment", "none")
        )
    if saved_run and values.get("block") == "repopt" and "repopt_scales" not in values:
        values["repopt_scales"] = "unit"  # RepOpt runs saved before `repopt_scales` trained with unit scales
    return {key: value for key, value in values.items() if key not in NOT_SAVED}


@dataclass
class SegTrainConfig(RunConfig):
    """A PSPNet training run (``repvgg train-seg``); saved as ``config.json`` in the output folder, with the
    same rules as :class:`TrainConfig` (a saved one repeats the run, resuming continues it)."""

    RANGES: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "epochs": (1, None),
        "batch_size": (1, None),
        "lr": RANGES["lr"],
        "weight_decay": (0, None),
        "num_classes": (2, None),
        "image_size": RANGES["image_size"],
        "head_channels": (2, None),
        "aux_weight": (0, None),
        "seed": RANGES["seed"],
        "workers": RANGES["workers"],
        "log_interval": (0, None),
        "train_subset": (1, None),
        "val_subset": (1, None),
    }
    POSITIVE: ClassVar[tuple[str, ...]] = ("lr",)  # as train's: a learning rate of 0 trains nothing
    RESUMABLE: ClassVar[tuple[str, ...]] = (
        "epochs",
        "workers",
        "device",
        "progress",
        "log_interval",
        "data_dir",
        "output",
        "overwrite",
    )

    model: str = field(default="repvgg_a0", metadata={"help": "backbone model name"})
    data: str = field(
        default="fashion-mnist-seg",
        metadata={
            "help": "dataset: Fashion-MNIST mosaics (the Debian package's), or a folder of images and masks",
            "choices": SEG_DATASETS,
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Fashion-MNIST idx files, or the folder dataset (train/ and val/)",
            "default": "the Debian package's folder, for fashion-mnist-seg",
        },
    )
    num_classes: int | None = field(
        default=None,
        metadata={"help": "classes of a folder dataset", "default": "11 for fashion-mnist-seg"},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "crop size of a folder dataset",
            "default": "512 for a folder, 56 (fixed) for fashion-mnist-seg",
        },
    )
    epochs: int = field(default=2, metadata={"help": "training epochs"})
    batch_size: int = field(default=16, metadata={"help": "images per step"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate, poly schedule (power 0.9)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay"})
    output_stride: int = field(
        default=8, metadata={"help": "input size / feature-map size", "choices": (8, 16, 32)}
    )
    dilation_mode: str = field(
        default="full",
        metadata={
            "help": "how the last stages are dilated (fast: the network's last 5 layers only)",
            "choices": ("full", "fast"),
        },
    )
    head_channels: int = field(default=128, metadata={"help": "channels of the pyramid pooling head"})
    aux_weight: float = field(default=0.4, metadata={"help": "auxiliary head loss weight, 0 for none"})
    backbone_weights: str | None = field(
        default=None,
        metadata={
            "help": "start the backbone from a classification checkpoint (its head is dropped)",
            "default": "none",
        },
    )
    train_subset: int | None = field(
        default=None, metadata={"help": "train on this many images", "default": "all"}
    )
    val_subset: int | None = field(
        default=None, metadata={"help": "evaluate on this many images", "default": "all"}
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    output: str = field(default="runs/pspnet", metadata={"help": "run folder"})
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda or cuda:N", "default": "cuda when available"}
    )
    workers: int = field(default=0, metadata={"help": "data-loading processes"})
    progress: bool = run_field("progress")
    log_interval: int = run_field("log_interval")
    overwrite: bool = run_field("overwrite")
