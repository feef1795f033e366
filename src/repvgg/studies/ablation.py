"""``repvgg ablate``: the paper's Tables 6 and 7 as a study anyone can rerun.

Every variant (a block design of :data:`repvgg.blocks.BLOCK_DESIGNS`, or the ``residual_reorg`` layout)
is trained with the same settings and the same seeds, one run folder each (``OUTPUT/<variant>/seed<k>``).
A finished run is recognised by its ``summary.json`` and skipped, a half-done one is resumed from its
``last.pt``, so an interrupted study continues where it stopped. Each variant's inference speed is timed
on the trained model before and after conversion, interleaved, at the data's image size. The table
(mean and standard deviation over seeds) is written as ``ablation.md`` and ``ablation.json``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.core.designs import BLOCK_DESIGNS
from repvgg.core.fusion import conv_bn_relu
from repvgg.core.info import ModelInfo, Preprocessing, model_info
from repvgg.core.models import stage_widths
from repvgg.core.registry import MODEL_SPECS, canonical_name
from repvgg.core.reparam import is_convertible, reparameterize
from repvgg.engine.config import LAYOUTS, TrainConfig
from repvgg.engine.data import DataBundle, strides_for_image_size
from repvgg.engine.training import STATE_FILE, build_repvgg, train
from repvgg.exceptions import ModelConfigError
from repvgg.io.checkpoints import load_checkpoint, read_checkpoint
from repvgg.io.files import atomic_write, folder_lock
from repvgg.io.jsonfile import write_json
from repvgg.runtime.device import device_name, resolve_device
from repvgg.runtime.measure import time_interleaved

LAYOUT_VARIANTS = tuple(layout for layout in LAYOUTS if layout != "repvgg")  # the non-RepVGG baselines
TABLE6 = ("repvgg", "no_identity", "no_1x1", "plain")
VARIANTS = (*BLOCK_DESIGNS, *LAYOUT_VARIANTS)


@dataclass
class AblationConfig:
    """One study: the variants, the shared training settings, the seeds."""

    model: str = "repvgg_a0"
    variants: list[str] = field(default_factory=lambda: list(TABLE6))
    seeds: int = 3
    data: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 1
    batch_size: int = 128
    lr: float | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    output: str = "runs/ablate"
    speed_batch: int = 64
    image_size: int | None = None  # None: the dataset's native size
    device: str | None = None  # None: CUDA when available
    workers: int | None = None
    progress: bool = True
    log_interval: int = 50

    def validate(self) -> None:
        resolve_device(self.device, ModelConfigError)  # before the study's folder is made
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ModelConfigError(f"Unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}.")
        if self.seeds < 1:
            raise ModelConfigError("`seeds` must be at least 1.")

    def train_config(self, variant: str, seed: int) -> TrainConfig:
        layout = variant if variant in LAYOUT_VARIANTS else "repvgg"
        return TrainConfig(
            model=self.model,
            block="repvgg" if layout != "repvgg" else variant,
            layout=layout,
            data=self.data,
            data_dir=self.data_dir,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            train_subset=self.train_subset,
            val_subset=self.val_subset,
            output=str(Path(self.output) / variant / f"seed{seed}"),
            image_size=self.image_size,
            device=self.device,
            workers=self.workers,
            progress=self.progress,
            log_interval=self.log_interval,
        )


class ResidualReorg(nn.Module):
    """The paper's "Residual Reorg" baseline (Table 7): a RepVGG's 3x3 layers paired into torchvision
    ``BasicBlock`` residual blocks (a stage of 2n layers has n blocks; an odd layer out comes first as a plain
    conv-BN-ReLU carrying the stride, so a stage of one layer stays one conv-BN-ReLU). Not a RepVGG: it has
    no plain form. Module names follow RepVGG's (``stage0`` ... ``stage4``, ``gap``, ``linear``).
    """

    def __init__(
        self, name: str, num_classes: int, in_chans: int = 3, strides: tuple[int, ...] = (2, 2, 2, 2, 2)
    ) -> None:
        super().__init__()
        self.model_name = canonical_name(name)
        spec = MODEL_SPECS[self.model_name]
        if spec.use_se or spec.groups > 1:
            raise ModelConfigError(
                "The residual_reorg baseline has no SE and no grouped layers: build it from an A or "
                "ungrouped B model."
            )
        widths = stage_widths(spec.width_multiplier)
        self.stage0 = conv_bn_relu(in_chans, widths[0], 3, strides[0])
        for stage, depth in enumerate(spec.num_blocks, start=1):
            stride = strides[stage]
            setattr(self, f"stage{stage}", _residual_stage(widths[stage - 1], widths[stage], depth, stride))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[4], num_classes)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.class_names: list[str] | None = None
        self.preprocessing: Preprocessing | None = None

    @property
    def info(self) -> ModelInfo:
        names = tuple(self.class_names) if self.class_names is not None else None
        return ModelInfo(
            self.model_name, None, names, self.preprocessing, "none", module_type="ResidualReorg"
        )

    def forward(self, x: Tensor) -> Tensor:
        for stage in (self.stage0, self.stage1, self.stage2, self.stage3, self.stage4):
            x = stage(x)
        return self.linear(torch.flatten(self.gap(x), 1))


def _residual_stage(in_planes: int, planes: int, depth: int, stride: int) -> nn.Sequential:
    """``depth`` 3x3 layers as residual pairs (1x1 projection shortcut where the shape changes)."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = []
    if depth % 2:
        layers.append(conv_bn_relu(in_planes, planes, 3, stride))
        in_planes, stride = planes, 1
    for _ in range(depth // 2):
        shortcut = None
        if stride != 1 or in_planes != planes:
            shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers.append(BasicBlock(in_planes, planes, stride=stride, downsample=shortcut))
        in_planes, stride = planes, 1
    return nn.Sequential(*layers)


def build_network(config: TrainConfig, data: DataBundle) -> nn.Module:
    """A run's network: the residual baseline for ``layout="residual_reorg"``, else the run's RepVGG."""
    if config.layout != "residual_reorg":
        return build_repvgg(config, data)
    strides = tuple(config.strides or strides_for_image_size(data.image_size))
    model = ResidualReorg(config.model, data.num_classes, data.in_chans, strides)
    model.class_names, model.preprocessing = data.class_names, data.preprocessing
    return model


def load_trained(checkpoint: Path, config: TrainConfig) -> nn.Module:
    """The model a run of ``config`` saved in ``checkpoint`` (the residual baseline cannot rebuild itself)."""
    if config.layout != "residual_reorg":
        return load_checkpoint(checkpoint)
    info = read_checkpoint(checkpoint).info
    image_size = info.preprocessing.image_size if info.preprocessing else 224
    strides = tuple(config.strides or strides_for_image_size(image_size))
    model = ResidualReorg(config.model, len(info.class_names or ()), info.in_chans, strides)
    load_checkpoint(checkpoint, model=model)
    model.class_names, model.preprocessing = list(info.class_names or ()), info.preprocessing
    return model


def run_folder_state(folder: Path) -> str:
    """``done`` (summary written), ``partial`` (a run to resume: a checkpoint, or a run stopped before its
    first one, which resuming starts from epoch 1) or ``new``."""
    if (folder / "summary.json").is_file():
        return "done"
    if (folder / STATE_FILE).is_file() or (folder / "config.json").is_file():
        return "partial"
    return "new"


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean, and the sample standard deviation (None for one value: one seed has no spread)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean_pm_std(mean: float, std: float | None, sign: str = "") -> str:
    """``84.12 +- 0.35``; a mean alone where there is no spread (one seed)."""
    return f"{mean:{sign}.2f}" + (f" +- {std:.2f}" if std is not None else "")


@torch.inference_mode()
def time_forms(model: nn.Module, batch: int, device: torch.device | None = None) -> dict[str, Any]:
    """Examples/s of a trained model as trained and, where it converts, as converted (interleaved), at
    the image size it was trained on, on ``device`` (the CPU by default)."""
    device = device or torch.device("cpu")
    model = model.eval().to(device)
    info = model_info(model)
    image_size = info.preprocessing.image_size if info.preprocessing else 224
    inputs = torch.randn(batch, info.in_chans, image_size, image_size, device=device)
    forms = {"train": model}
    if is_convertible(model):
        forms["deploy"] = reparameterize(model)
    measured = time_interleaved(forms, inputs, warmup=2, rounds=10)
    return {
        "train_examples_per_s": measured["train"].images_per_s,
        "deploy_examples_per_s": measured["deploy"].images_per_s if "deploy" in measured else None,
        "speed_device": device_name(device),
    }


#: Settings a study may change when it goes on in its folder: more variants, more seeds, the progress bar.
EXTENSIBLE = ("variants", "seeds", "output", "progress", "log_interval", "device", "workers")


def refuse_other_settings(config: AblationConfig, saved_file: Path) -> None:
    """A study folder's finished runs are reused, so its shared training settings must be this study's."""
    if not saved_file.is_file():
        return
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelConfigError(f"{saved_file} is damaged ({error}); choose another `output`.") from error
    current = dataclasses.asdict(config)
    changed = [k for k in current if k not in EXTENSIBLE and k in saved and saved[k] != current[k]]
    if changed:
        names = ", ".join(f"`{k}` ({saved[k]!r} -> {current[k]!r})" for k in changed)
        raise ModelConfigError(
            f"{saved_file.parent} holds a study with other settings ({names}); its runs would be reused "
            "under the new heading: choose another `output`, or keep the study's settings."
        )


def run_ablation(config: AblationConfig) -> dict[str, Any]:
    """Train (or resume, or skip) every variant x seed, time each variant, write the tables."""
    config.validate()
    with folder_lock(config.output, "this study", ModelConfigError) as output:
        return _study(config, output)


def _study(config: AblationConfig, output: Path) -> dict[str, Any]:
    refuse_other_settings(config, output / "ablation_config.json")
    write_json(output / "ablation_config.json", dataclasses.asdict(config), what="the study's settings")
    rows = []
    for variant in config.variants:
        summaries = []
        for seed in range(config.seeds):
            run_config = config.train_config(variant, seed)
            folder = Path(run_config.output)
            state = run_folder_state(folder)
            if state != "done":
                print(
                    f"{variant}, seed {seed}: {'resuming' if state == 'partial' else 'training'}",
                    flush=True,
                )
                train(run_config, resume=state == "partial", build_network=build_network)
            summaries.append(json.loads((folder / "summary.json").read_text()))
        speed_file = output / variant / "speed.json"
        if not speed_file.is_file():
            first = config.train_config(variant, 0)
            trained = load_trained(Path(first.output) / "model_train.safetensors", first)
            speed = time_forms(trained, config.speed_batch, resolve_device(config.device, ModelConfigError))
            write_json(speed_file, speed, what="the variant's speed")
        rows.append(_row(variant, summaries, json.loads(speed_file.read_text())))
    for row in rows:
        row["vs_reference_mean"], row["vs_reference_std"] = _mean_std(
            [ours - theirs for ours, theirs in zip(row["train_top1"], rows[0]["train_top1"], strict=True)]
        )
    report = {"config": dataclasses.asdict(config), "rows": rows}
    write_json(output / "ablation.json", report, what="the study's table")
    table = markdown_table(report)
    atomic_write(output / "ablation.md", lambda target: target.write_text(table), what="the study's table")
    return report


def _row(variant: str, summaries: list[dict[str, Any]], speed: dict[str, Any]) -> dict[str, Any]:
    train_top1 = [s["train_form"]["top1"] for s in summaries]
    deploy = [s["deploy_form"]["top1"] for s in summaries if s["deploy_form"] is not None]
    mean, std = _mean_std(train_top1)
    row: dict[str, Any] = {
        "variant": variant,
        "description": BLOCK_DESIGNS[variant].description
        if variant in BLOCK_DESIGNS
        else "ResNet-like two-layer residual blocks (Table 7's Residual Reorg)",
        "seeds": len(summaries),
        "train_top1": train_top1,
        "train_top1_mean": mean,
        "train_top1_std": std,
        "deploy_top1_mean": None,
        "deploy_top1_std": None,
        **speed,
    }
    if deploy:
        row["deploy_top1_mean"], row["deploy_top1_std"] = _mean_std(deploy)
    return row


def markdown_table(report: dict[str, Any]) -> str:
    config = report["config"]
    reference = report["rows"][0]["variant"]
    epochs = f"{config['epochs']} epoch{'s' if config['epochs'] != 1 else ''}"
    seeds = config["seeds"]
    spread = "mean +- std over seeds" if seeds > 1 else "one seed, so no spread is shown"
    where = report["rows"][0].get("speed_device")
    lines = [
        f"{config['model']} on {config['data']}, {epochs}, batch {config['batch_size']}, "
        f"{seeds} seed{'s' if seeds > 1 else ''} (0..{seeds - 1}); top-1 as {spread}; "
        f"'vs {reference}': the per-seed difference from {reference} (same seed, same data order); speed in "
        f"examples/s at batch {config['speed_batch']}{f' on {where}' if where else ''} (seed 0's model, "
        "interleaved).",
        "",
        f"| variant | top-1 as trained | per seed | vs {reference} | top-1 converted | examples/s as trained "
        "| examples/s converted |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(report["rows"], key=lambda r: -r["train_top1_mean"]):
        converted = (
            _mean_pm_std(row["deploy_top1_mean"], row["deploy_top1_std"])
            if row["deploy_top1_mean"] is not None
            else "not convertible"
        )
        deploy_speed = row["deploy_examples_per_s"]
        trained = _mean_pm_std(row["train_top1_mean"], row["train_top1_std"])
        per_seed = ", ".join(f"{top1:.2f}" for top1 in row["train_top1"])
        versus = _mean_pm_std(row["vs_reference_mean"], row["vs_reference_std"], sign="+")
        lines.append(
            f"| {row['variant']} | {trained} | {per_seed} | {versus} | {converted} | "
            f"{row['train_examples_per_s']:.0f} | {f'{deploy_speed:.0f}' if deploy_speed else '-'} |"
        )
    return "\n".join(lines) + "\n"
