"""The paper's training recipe, on one CPU or many GPUs (PyTorch DDP launched by ``torchrun``).

``train(config)`` trains the multi-branch model, checkpoints every epoch atomically (resumable to the
exact weights of an uninterrupted run), then converts it and checks that the plain model scores the
same, and saves both forms in this package's checkpoint format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from repvgg.blocks import RepVGGBlock, block_design
from repvgg.checkpoints import atomic_write, load_checkpoint, read_checkpoint, save_checkpoint
from repvgg.data import (
    BadImage,
    DataBundle,
    build_data,
    collate_reporting_bad,
    default_workers,
    strides_for_image_size,
)
from repvgg.distributed import (
    DistContext,
    all_reduce_sum,
    average_buffers,
    init_distributed,
    ranks_agree,
    shutdown,
)
from repvgg.evaluation import EvalResult, eval_loader, evaluate
from repvgg.exceptions import CheckpointError, DataError, TrainingError
from repvgg.models import RepVGG, create_model
from repvgg.reparam import is_convertible, reparameterize

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_FILE = "last.pt"


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` in the output folder."""

    model: str = "repvgg_a0"
    block: str = "repvgg"  # a key of repvgg.blocks.BLOCK_DESIGNS, e.g. "qarepvgg"
    layout: str = "repvgg"  # or "residual_reorg", the paper's ResNet-like baseline
    data: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128  # per process
    lr: float | None = None  # None: 0.1 x global batch / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    custom_l2: bool = False
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    autoaugment: bool = False
    ema_decay: float | None = None
    amp: str = "none"
    channels_last: bool = False
    grad_checkpointing: bool = False
    image_size: int | None = None
    strides: list[int] | None = None  # None: the paper's, adapted to small images
    seed: int = 0
    workers: int | None = None  # None: 0 for in-memory sets, else up to 8
    train_subset: int | None = None
    val_subset: int | None = None
    output: str = "runs/train"
    init: str | None = None
    finetune: bool = False
    sync_bn: bool = False
    skip_bad_images: bool = False
    device: str | None = None
    progress: bool = True
    overwrite: bool = False  # start afresh in an output folder that already holds a run

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"Unknown configuration keys {', '.join(unknown)}: check the --config file.")
        return cls(**values)

    def validate(self) -> None:
        if self.amp not in AMP_DTYPES:
            raise TrainingError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("--epochs and --batch-size must be at least 1.")
        design = block_design(self.block)
        if self.custom_l2 and not (design.dense == "bn" and design.one_by_one == "bn" and design.convertible):
            raise TrainingError(
                f"--custom-l2 needs 3x3 and 1x1 branches that end in BatchNorm; the {self.block!r} block "
                "has not, so drop --custom-l2 (it trains with plain weight decay)."
            )
        if self.finetune and not self.init:
            raise TrainingError(
                "--finetune replaces the head of the --init checkpoint; give --init CKPT too."
            )


class WarmupCosine:
    """Learning-rate factor per step: linear warm-up, then cosine annealing to zero."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: nn.Module, weight_decay: float, custom_l2: bool) -> list[dict[str, Any]]:
    """The authors' weight-decay exclusions: none on biases and on the 3x3/1x1 branches' BN weights.

    The identity branch's BN weight keeps its decay. With ``custom_l2`` the two branch kernels are
    regularised through the loss instead, so they get no decay here either.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        branch_kernel = name.endswith(("rbr_dense.conv.weight", "rbr_1x1.conv.weight"))
        if name.endswith("bias") or ".bn." in name or (custom_l2 and branch_kernel):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def custom_l2_loss(model: nn.Module) -> torch.Tensor:
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock) and not m.deploy]
    return torch.stack([block.custom_l2() for block in blocks]).sum()


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunLog:
    """Per-epoch metrics as JSON lines and TensorBoard events (written by rank 0 only)."""

    def __init__(self, output: Path, enabled: bool, keep_through_epoch: int) -> None:
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run: drop epochs that the checkpoint does not cover
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] <= keep_through_epoch
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=keep_through_epoch + 1)

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        assert self.writer is not None
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, unit="batch", dynamic_ncols=True)


class Trainer:
    """One training run. Construct, then call :meth:`run`."""

    def __init__(self, config: TrainConfig, context: DistContext) -> None:
        config.validate()
        self.config = config
        self.context = context
        self.output = Path(config.output)
        self.amp_dtype = AMP_DTYPES[config.amp]
        if config.amp == "fp16" and context.device.type != "cuda":
            raise TrainingError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU.")
        if config.sync_bn and context.device.type != "cuda":
            raise TrainingError(
                "--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs only on GPUs); drop it on CPU."
            )
        self.bad_images = 0
        _seed_everything(config.seed + context.rank)  # DDP gives every rank rank 0's initial weights
        self.data = build_data(
            config.data,
            config.data_dir,
            image_size=config.image_size,
            autoaugment=config.autoaugment,
            train_subset=config.train_subset,
            val_subset=config.val_subset,
            seed=config.seed,
        )
        self.model = self._build_model(self.data)
        self.workers = config.workers if config.workers is not None else default_workers(self.data)
        self.train_loader, self.sampler = self._train_loader()
        self.val_loader = eval_loader(self.data.val, config.batch_size, self.workers, context)
        self.steps_per_epoch = len(self.train_loader)
        global_batch = config.batch_size * context.world_size
        self.lr = config.lr if config.lr is not None else 0.1 * global_batch / 256
        self.optimizer = torch.optim.SGD(
            parameter_groups(self.model, config.weight_decay, config.custom_l2),
            lr=self.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
        )
        total_steps = config.epochs * self.steps_per_epoch
        warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(warmup_steps, total_steps)
        )
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=config.amp == "fp16")
        self.ema = None
        if config.ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
            )
        self.network: nn.Module = self.model
        if context.distributed:
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[context.device.index] if context.device.type == "cuda" else None
            )
        self.mixup = None
        if config.mixup > 0:
            from torchvision.transforms import v2

            self.mixup = v2.MixUp(alpha=config.mixup, num_classes=self.data.num_classes)
        self.start_epoch = 1
        self.best_top1 = -1.0

    def _build_model(self, data: DataBundle) -> RepVGG:
        config = self.config
        strides = config.strides or list(strides_for_image_size(data.image_size))
        model = create_model(
            config.model,
            num_classes=data.num_classes,
            in_chans=data.in_chans,
            strides=strides,
            use_checkpoint=config.grad_checkpointing,
            block=config.block,
            layout=config.layout,
        )
        model.class_names = data.class_names
        model.preprocessing = data.preprocessing.as_dict()
        if config.init:
            self._load_initial_weights(model)
        if config.sync_bn and self.context.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[assignment]
        model = model.to(self.context.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _load_initial_weights(self, model: RepVGG) -> None:
        checkpoint = read_checkpoint(self.config.init)  # type: ignore[arg-type]
        if checkpoint.form != "train":
            raise CheckpointError(
                "--init needs a training-form checkpoint (a converted model cannot be trained as RepVGG); "
                "use the *_train checkpoint of the run."
            )
        if checkpoint.num_classes != model.num_classes:
            if not self.config.finetune:
                raise CheckpointError(
                    f"The --init checkpoint has {checkpoint.num_classes} classes but {self.config.data} has "
                    f"{model.num_classes}: add --finetune to replace its classifier head."
                )
            state = {k: v for k, v in checkpoint.state_dict.items() if not k.startswith("linear.")}
            checkpoint.state_dict = {
                **state,
                **{f"linear.{k}": v for k, v in model.linear.state_dict().items()},
            }
        load_checkpoint(checkpoint.state_dict, model=model)

    def _train_loader(self) -> tuple[DataLoader[Any], DistributedSampler[Any] | None]:
        config, context = self.config, self.context
        if len(self.data.train) < config.batch_size * context.world_size:  # type: ignore[arg-type]
            raise DataError(
                f"The training set has {len(self.data.train)} images, fewer than one global batch of "  # type: ignore[arg-type]
                f"{config.batch_size * context.world_size}; lower --batch-size or raise --train-subset."
            )
        sampler = None
        self.generator = torch.Generator()
        if context.distributed:
            sampler = DistributedSampler(
                self.data.train,
                context.world_size,
                context.rank,
                shuffle=True,
                seed=config.seed,
                drop_last=True,
            )
        loader = DataLoader(
            self.data.train,
            batch_size=config.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=self.workers,
            collate_fn=collate_reporting_bad,
            drop_last=True,
            generator=self.generator,
            persistent_workers=False,
            pin_memory=context.device.type == "cuda",
        )
        return loader, sampler

    # -- checkpoints of the training state ------------------------------------------------------

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "best_top1": self.best_top1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": _rng_state(),
            "bad_images": self.bad_images,
        }

    def resume(self) -> None:
        path = self.output / STATE_FILE
        if not path.is_file():
            raise TrainingError(
                f"Nothing to resume in {self.output}: it has no {STATE_FILE}; start without --resume."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise TrainingError(
                f"{path} cannot be read ({error}); it is damaged, start the run again."
            ) from error
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            first_line = str(error).splitlines()[0]
            raise TrainingError(
                f"The saved state in {path} does not fit the configured model ({first_line}); "
                "resume with the run's own configuration (drop the flags that changed it)."
            ) from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_top1 = float(state["best_top1"])
        self.bad_images = int(state["bad_images"])

    # -- the loop -----------------------------------------------------------------------------------

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The order of an epoch depends on the seed and the epoch only, so a resumed run replays it.
        self.generator.manual_seed((self.config.seed * 100_003 + epoch) * 1_009 + self.context.rank)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        for images, labels, bad in self.train_loader:
            if bad:
                self._report_bad(bad)
            if len(labels) == 0:
                continue
            yield images, labels

    def _report_bad(self, bad: list[BadImage]) -> None:
        if not self.config.skip_bad_images:
            raise bad[0].error("fix or remove it, or pass --skip-bad-images")
        self.bad_images += len(bad)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        config, device = self.config, self.context.device
        self.network.train()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        start = time.perf_counter()
        bar = _progress(
            self.steps_per_epoch, f"epoch {epoch}/{config.epochs}", self.context.is_main and config.progress
        )
        for step, (images, labels) in enumerate(self._batches(epoch)):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets: torch.Tensor = labels
            if self.mixup is not None:
                images, targets = self.mixup(images, labels)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.network(images)
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
            if config.custom_l2:
                loss = loss + 0.5 * config.weight_decay * custom_l2_loss(self.model)
            self._stop_if_not_finite(loss, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            hard_labels = targets.argmax(1) if targets.ndim == 2 else targets
            correct = float((logits.argmax(1) == hard_labels).sum())
            totals += torch.tensor(
                [float(loss.detach()) * len(labels), correct, len(labels)], dtype=torch.float64
            )
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(
                loss=f"{totals[0] / totals[2]:.3f}",
                acc=f"{100 * totals[1] / totals[2]:.1f}",
                img_s=f"{totals[2] * self.context.world_size / elapsed:.0f}",
                refresh=False,
            )
        bar.close()
        seconds = time.perf_counter() - start
        totals = all_reduce_sum(totals, self.context)
        count = max(float(totals[2]), 1.0)
        return {
            "train_loss": float(totals[0]) / count,
            "train_top1": 100.0 * float(totals[1]) / count,
            "train_images_per_s": count / seconds,
            "epoch_seconds": seconds,
        }

    def _stop_if_not_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if float(all_reduce_sum(bad, self.context)[0]) == 0:
            return
        kept = self.output / STATE_FILE
        where = f"{kept} (epoch {self.start_epoch - 1})" if kept.is_file() else "none yet"
        raise TrainingError(
            f"The loss became {float(loss.detach()):.4g} at epoch {epoch}, step {step + 1}, so training "
            f"stopped; the last good checkpoint is kept ({where}): lower --lr or use --amp bf16/none, "
            "then --resume."
        )

    def _evaluate(self, model: nn.Module) -> EvalResult:
        return evaluate(
            model,
            self.val_loader,
            self.context,
            amp_dtype=self.amp_dtype,
            channels_last=self.config.channels_last,
            on_bad_images=self._report_bad,
        )

    def run(self) -> dict[str, Any]:
        config, context = self.config, self.context
        if context.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        log = RunLog(self.output, context.is_main, keep_through_epoch=self.start_epoch - 1)
        try:
            for epoch in range(self.start_epoch, config.epochs + 1):
                record: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
                record.update(self._train_epoch(epoch))
                average_buffers(self.model, context)
                if self.ema is not None:
                    average_buffers(self.ema, context)
                result = self._evaluate(self.model)
                record.update(result.as_dict("val_"))
                if self.ema is not None:
                    record.update(self._evaluate(self.ema.module).as_dict("ema_val_"))
                record["bad_images"] = self.bad_images
                improved = result.top1 > self.best_top1
                self.best_top1 = max(self.best_top1, result.top1)
                if context.is_main:
                    log.epoch(record)
                    if improved:
                        save_checkpoint(self.model, self.output / "best_train.safetensors")
                    atomic_write(self.output / STATE_FILE, partial(torch.save, self._state(epoch)))
                    self.start_epoch = epoch + 1
                    _print_epoch(record, config.epochs)
                else:
                    self.start_epoch = epoch + 1
            return self._finish()
        finally:
            log.close()

    def _finish(self) -> dict[str, Any]:
        """Evaluate the final model in both forms, check they agree, and save both."""
        final: nn.Module = self.ema.module if self.ema is not None else self.model
        identical = ranks_agree(final, self.context)
        final.eval()
        trained = self._evaluate(final)
        summary: dict[str, Any] = {
            "model": self.config.model,
            "block": self.config.block,
            "layout": self.config.layout,
            "data": self.config.data,
            "epochs": self.config.epochs,
            "weights": "ema" if self.ema is not None else "last",
            "train_form": trained.as_dict(),
            "deploy_form": None,
            "top1_difference": None,
            "forms_agree": None,
            "bad_images_skipped": self.bad_images,
            "processes": self.context.world_size,
            "ranks_hold_identical_weights": identical,
        }
        deployed_model = reparameterize(final) if is_convertible(final) else None
        if deployed_model is not None:  # the relu_in_branch block and the residual layout have no plain form
            deployed = self._evaluate(deployed_model)
            summary["deploy_form"] = deployed.as_dict()
            summary["top1_difference"] = abs(trained.top1 - deployed.top1)
            summary["forms_agree"] = (
                abs(trained.top1 - deployed.top1) <= 0.01 and abs(trained.top5 - deployed.top5) <= 0.01
            )
        if self.context.is_main:
            save_checkpoint(final, self.output / "model_train.safetensors")
            if deployed_model is not None:
                save_checkpoint(deployed_model, self.output / "model_deploy.safetensors")
            (self.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _print_epoch(record: dict[str, Any], epochs: int) -> None:
    line = (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, "
        f"train top-1 {record['train_top1']:.2f}%, val top-1 {record['val_top1']:.2f}%, "
        f"val top-5 {record['val_top5']:.2f}%, {record['train_images_per_s']:.0f} img/s"
    )
    if "ema_val_top1" in record:
        line += f", EMA val top-1 {record['ema_val_top1']:.2f}%"
    print(line, flush=True)


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) a training run; returns the final summary."""
    state = Path(config.output) / STATE_FILE
    if state.exists() and not resume and not config.overwrite:
        raise TrainingError(
            f"{config.output} already holds a run ({state}); continue it with --resume, or choose another "
            "--output, or pass --overwrite to replace it."
        )
    context = init_distributed(config.device)
    try:
        trainer = Trainer(config, context)
        if resume:
            trainer.resume()
        return trainer.run()
    finally:
        shutdown()


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
