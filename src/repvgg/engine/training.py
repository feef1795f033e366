"""The one training loop, and the paper's classification recipe built on it (one CPU or many GPUs, PyTorch
DDP launched by ``torchrun``).

:class:`Trainer` is the loop: mixed precision, DDP, EMA, progress, a stop on a non-finite loss, per-epoch
evaluation and logging, and the training state ``last.pt`` written atomically every epoch (resumable to the
exact weights of an uninterrupted run). A :class:`Task` supplies what differs between uses: the loss, the
training accuracy and the validation metrics. Classification (:func:`train`), PSPNet segmentation and
quantization-aware training (``repvgg.studies``) all run through it, with the one :class:`LRSchedule`.

``train(config)`` trains the multi-branch model, then converts it, checks that the plain model scores the
same, and saves both forms in this package's checkpoint format.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from repvgg.core.blocks import RepVGGBlock
from repvgg.core.models import RepVGG
from repvgg.core.registry import create_model
from repvgg.core.reparam import (
    is_convertible,
    refuse_nonfinite,
    reparameterize,
    start_merged_from,
    trains_one_conv,
)
from repvgg.core.repopt import (
    DEFAULT_SCALE_RULE,
    SCALE_RULES,
    BranchScales,
    rule_scales,
    searched_scales,
)
from repvgg.engine.config import Config, TrainConfig, load_run_config
from repvgg.engine.data import (
    Augmentation,
    DataBundle,
    build_data,
    collate_reporting_bad,
    dataset_folder,
    default_crop_pct,
    default_workers,
    strides_for_image_size,
)
from repvgg.engine.distributed import (
    DistContext,
    all_reduce_sum,
    average_buffers,
    init_distributed,
    ranks_agree,
    shutdown,
)
from repvgg.engine.environment import environment
from repvgg.engine.evaluation import AMP_DTYPES, EvalResult, eval_loader, evaluate
from repvgg.engine.recipe import (
    BatchMixing,
    GradientMultipliers,
    LRSchedule,
    batch_mixing,
    build_optimizer,
    default_lr,
    lr_rule,
    parameter_groups,
    repopt_multipliers,
)
from repvgg.exceptions import DataError, ModelConfigError, TrainingError
from repvgg.io.checkpoints import (
    load_checkpoint,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_training_state,
)
from repvgg.io.files import atomic_write, folder_lock, output_folder
from repvgg.io.images import BadImage
from repvgg.io.jsonfile import json_text, write_json
from repvgg.io.pretrained import load_pretrained
from repvgg.runtime.convert import verify_checkpoints
from repvgg.runtime.device import device_name
from repvgg.runtime.progress import progress_bar

STATE_FILE = "last.pt"
CHECKPOINT_FOLDER = "checkpoints"  # the best `keep_best` checkpoints of a run


def kept_name(epoch: int) -> str:
    """The file name of a kept checkpoint in ``checkpoints/``."""
    return f"epoch-{epoch:03d}.safetensors"


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
    """Per-epoch metrics as JSON lines and TensorBoard events (written by rank 0 only).

    TensorBoard tags are grouped (``train/loss``, ``val/top1``, ``ema_val/top1``); the loss and learning rate
    of every :data:`STEP_LOG_INTERVAL`-th step go to a second run, ``tensorboard/steps``, counted in steps.
    """

    def __init__(
        self, output: Path, enabled: bool, keep_through_epoch: int, steps_per_epoch: int = 0
    ) -> None:
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.writer = None
        self.step_writer = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run: drop epochs that the checkpoint does not cover
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] <= keep_through_epoch
            ]
            text = "".join(line + "\n" for line in kept)
            atomic_write(self.path, lambda target: target.write_text(text), what="the metrics")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=keep_through_epoch + 1)
        purge = keep_through_epoch * steps_per_epoch
        self.step_writer = SummaryWriter(str(output / "tensorboard" / "steps"), purge_step=purge)

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json_text(record) + "\n")
        assert self.writer is not None
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(tensorboard_tag(key), value, record["epoch"])
        self.writer.flush()

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.step_writer is not None and step % STEP_LOG_INTERVAL == 0:
            self.step_writer.add_scalar("train/loss", loss, step)
            self.step_writer.add_scalar("train/lr", lr, step)

    def close(self) -> None:
        for writer in (self.writer, self.step_writer):
            if writer is not None:
                writer.close()


def write_hparams(output: Path, values: dict[str, Any], metrics: dict[str, float]) -> None:
    """A run's settings beside its final figures, for TensorBoard's HPARAMS tab (``tensorboard/hparams``)."""
    from torch.utils.tensorboard import SummaryWriter

    settings = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in values.items()}
    finite = {f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
    with SummaryWriter(str(output / "tensorboard")) as writer:
        writer.add_hparams(settings, finite, run_name="hparams")


STEP_LOG_INTERVAL = 10  # steps between the per-step TensorBoard points
_TAG_GROUPS = ("ema_val_", "train_", "val_")


def tensorboard_tag(key: str) -> str:
    """``train_loss`` -> ``train/loss``, ``val_top1`` -> ``val/top1``; other keys go under ``run/``."""
    for prefix in _TAG_GROUPS:
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"train/{key}" if key == "lr" else f"run/{key}"


class Task:
    """What a :class:`Trainer` optimises and how it scores: the hooks that differ between uses.

    The defaults are classification's loss and accuracy; :meth:`evaluate` returns no metrics (QAT trains
    without validation). ``primary`` names the validation metric that picks the best epoch by default
    (higher is better; a metric named ``loss`` is better lower).
    """

    primary = "top1"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=self.label_smoothing)

    def correct(self, outputs: Any, targets: torch.Tensor) -> float | None:
        """How many samples of the batch are right (for the running training accuracy); None: not counted."""
        hard_labels = targets.argmax(1) if targets.ndim == 2 else targets  # mixup gives soft targets
        return float((outputs.argmax(1) == hard_labels).sum())

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Validation metrics of ``model`` (its mode is restored by the caller)."""
        return {}

    def epoch_line(self, record: dict[str, Any], epochs: int) -> str | None:
        """The line printed after each epoch (None: nothing)."""
        return None


class Trainer:
    """The one training loop. Construct with the pieces of a run, optionally :meth:`resume`, then :meth:`fit`.

    ``loader`` (a DataLoader, or a list of batches) yields ``(inputs, targets)`` or
    ``(inputs, targets, bad_images)`` (see
    ``repvgg.engine.data.collate_reporting_bad``); unreadable images stop the run unless
    ``skip_bad_images``. The loader's generator (and a ``DistributedSampler``'s epoch) is reseeded from
    ``seed`` and the epoch, so a resumed run replays the same batches. With ``output`` the run writes
    ``metrics.jsonl``, TensorBoard events and ``last.pt`` there every epoch (and ``best_file`` when the
    ``best_metric``, the task's primary one by default, improves); without it nothing is written.

    Each optimizer step accumulates the gradients of ``accum_steps`` batches (DDP synchronises only the
    last), multiplies the gradients of ``gradient_multipliers`` (RepOpt-VGG), clips their global norm to
    ``clip_grad`` and steps the schedule once. The best ``keep_best``
    checkpoints by ``best_metric`` (of the EMA weights when there is an EMA) are kept in ``checkpoints/``
    with a ranking ``checkpoints/best.json``; with ``patience``, training stops after that many epochs
    without a better one.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: DataLoader[Any],
        task: Task,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        *,
        epochs: int,
        context: DistContext | None = None,
        output: Path | None = None,
        best_file: str | None = None,
        amp: str = "none",
        channels_last: bool = True,
        ema_decay: float | None = None,
        mixup: BatchMixing | None = None,
        regularizer: Callable[[], torch.Tensor] | None = None,
        on_step: Callable[[int], None] | None = None,
        skip_bad_images: bool = False,
        seed: int = 0,
        progress: bool = True,
        log_interval: int = 0,
        accum_steps: int = 1,
        clip_grad: float | None = None,
        keep_best: int = 1,
        best_metric: str | None = None,
        patience: int | None = None,
        gradient_multipliers: GradientMultipliers | None = None,
    ) -> None:
        self.context = context or DistContext()
        if amp == "fp16" and self.context.device.type != "cuda":
            raise TrainingError("`amp` fp16 needs a CUDA device; use bf16 on the CPU.")
        self.model, self.loader, self.task, self.optimizer = model, loader, task, optimizer
        self.epochs, self.output, self.best_file = epochs, output, best_file
        self.amp_dtype = AMP_DTYPES[amp]
        self.channels_last, self.mixup, self.regularizer, self.on_step = (
            channels_last,
            mixup,
            regularizer,
            on_step,
        )
        self.skip_bad_images, self.seed, self.progress = skip_bad_images, seed, progress
        self.log_interval = log_interval
        self.accum_steps, self.clip_grad, self.keep_best, self.patience = (
            accum_steps,
            clip_grad,
            keep_best,
            patience,
        )
        self.steps_per_epoch = len(loader) // accum_steps  # optimizer steps
        if self.steps_per_epoch < 1:
            raise TrainingError(
                f"An epoch has {len(loader)} batches, fewer than the {accum_steps} accumulated per optimizer "
                "step (`accum_steps`); lower `accum_steps` or `batch_size`."
            )
        self.gradient_multipliers = [(p, m.to(p.device)) for p, m in gradient_multipliers or []]
        self.metric = best_metric or task.primary
        self.lower_is_better = self.metric == "loss"
        self.schedule = schedule  # kept apart: loading a scheduler's state rewrites its schedule objects
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, copy.copy(schedule))
        self.scaler = torch.amp.GradScaler(self.context.device.type, enabled=amp == "fp16")
        self.ema = None
        if ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.network: nn.Module = model
        if self.context.distributed:
            device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            self.network = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.start_epoch = 1
        self.best = math.inf if self.lower_is_better else -math.inf
        self.best_epoch: int | None = None
        self.kept: list[tuple[float, int]] = []  # (score, epoch) of the checkpoints kept, best first
        self.stopped_early: int | None = None  # the epoch after which patience ran out
        self.bad_images = 0
        self.records: list[dict[str, Any]] = []
        self.log: RunLog | None = None  # open while fit() runs

    # -- the training state ----------------------------------------------------------------------

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "kept": [list(item) for item in self.kept],
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": _rng_state(),
            "bad_images": self.bad_images,
            "gradient_multipliers": [multiplier for _, multiplier in self.gradient_multipliers],
        }

    def resume(self) -> None:
        """Continue from ``output/last.pt``: weights, optimizer, schedule, RNG, counters."""
        path = (self.output or Path(".")) / STATE_FILE
        if self.output is None or not path.is_file():
            raise TrainingError(f"Nothing to resume in {self.output}: it has no {STATE_FILE}; start afresh.")
        state = load_training_state(path)
        trained = int(state["epoch"])
        if self.epochs < trained:
            raise TrainingError(
                f"{self.output} has trained {trained} epochs already; `epochs` {self.epochs} would leave its "
                f"weights and metrics saying more than its record: give `epochs` of at least {trained} (more "
                "trains on)."
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            first_line = str(error).splitlines()[0]
            raise TrainingError(
                f"The saved state in {path} does not fit the configured model ({first_line}); "
                "resume with the run's own configuration (drop the options that changed it)."
            ) from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved state restores the schedule it was made with; the run's own (e.g. more epochs) goes on
        # from the step reached: the cosine is stretched over the new total from there.
        self.scheduler.lr_lambdas = [copy.copy(self.schedule) for _ in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.schedule(self.scheduler.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = float(state.get("best", state.get("best_top1", self.best)))
        self.best_epoch = state.get("best_epoch")
        self.kept = [(float(score), int(epoch)) for score, epoch in state.get("kept", [])]
        self.bad_images = int(state["bad_images"])
        saved = state.get("gradient_multipliers")  # the run's own (older states: as computed now)
        if saved is not None:
            if [m.shape for m in saved] != [m.shape for _, m in self.gradient_multipliers]:
                raise TrainingError(
                    f"The gradient multipliers saved in {path} do not fit the configured model; resume with "
                    "the run's own configuration."
                )
            for (_, multiplier), value in zip(self.gradient_multipliers, saved, strict=True):
                multiplier.copy_(value)

    # -- the loop ------------------------------------------------------------------------------------

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The order of an epoch depends on the seed and the epoch only, so a resumed run replays it.
        generator = getattr(self.loader, "generator", None)
        if generator is not None:
            generator.manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.context.rank)
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        dataset = getattr(self.loader, "dataset", None)
        if isinstance(dataset, IterableDataset):  # shards and streams shuffle themselves, per epoch and seed
            dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        for inputs, targets, *rest in self.loader:
            if rest and rest[0]:
                self.report_bad(rest[0])
            if len(targets) == 0:
                continue
            yield inputs, targets

    def report_bad(self, bad: list[BadImage]) -> None:
        """Unreadable images: counted with ``skip_bad_images``, else the run stops with the first one."""
        if not self.skip_bad_images:
            raise bad[0].error("fix or remove it, or skip unreadable images (`skip_bad_images`)")
        self.bad_images += len(bad)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        device = self.context.device
        self.network.train()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        counted = True
        start = time.perf_counter()
        bar = progress_bar(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch}/{self.epochs}",
            enabled=self.context.is_main and self.progress,
            leave=True,
        )
        micro_batches = self.steps_per_epoch * self.accum_steps  # a last incomplete step is left out
        for micro, (inputs, targets) in enumerate(self._batches(epoch)):
            if micro >= micro_batches:
                break
            step, phase = divmod(micro, self.accum_steps)
            global_step = (epoch - 1) * self.steps_per_epoch + step
            if phase == 0:
                if self.on_step is not None:
                    self.on_step(global_step)
                self.optimizer.zero_grad(set_to_none=True)
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            labels = targets
            if self.mixup is not None:
                inputs, targets = self.mixup(inputs, targets)
            last = phase == self.accum_steps - 1
            with self._gradient_sync(last):
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    outputs = self.network(inputs)
                    loss = self.task.loss(outputs, targets)
                if self.regularizer is not None:
                    loss = loss + self.regularizer()
                self._stop_if_not_finite(loss, epoch, step)
                self.scaler.scale(loss / self.accum_steps).backward()
            correct = self.task.correct(outputs, targets)
            counted = counted and correct is not None
            totals += torch.tensor(
                [float(loss.detach()) * len(labels), correct or 0.0, len(labels)], dtype=torch.float64
            )
            if not last:
                continue
            self._optimizer_step()
            if self.log is not None:
                self.log.step(global_step, float(loss.detach()), self.optimizer.param_groups[0]["lr"])
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            elapsed = time.perf_counter() - start
            bar.update(1)
            postfix = {"loss": f"{totals[0] / totals[2]:.3f}"}
            if counted:
                postfix["acc"] = f"{100 * totals[1] / totals[2]:.1f}"
            speed = f"{totals[2] * self.context.world_size / elapsed:.0f}"
            bar.set_postfix(img_s=speed, refresh=False, **postfix)
            if bar.disable and self._logs_step(step):
                shown = f"loss {postfix['loss']}" + (f", top-1 {postfix['acc']}%" if counted else "")
                lr = self.optimizer.param_groups[0]["lr"]
                where = f"epoch {epoch}/{self.epochs} step {step + 1}/{self.steps_per_epoch}"
                print(
                    f"{where}: {shown}, lr {lr:.4g}, {speed} img/s",
                    flush=True,
                )
        bar.close()
        seconds = time.perf_counter() - start
        totals = all_reduce_sum(totals, self.context)
        if float(totals[2]) == 0:
            raise TrainingError(
                f"Epoch {epoch} had no readable training images ({self.bad_images} unreadable so far), so "
                "nothing was trained; fix the dataset."
            )
        count = float(totals[2])
        record = {"train_loss": float(totals[0]) / count}
        if counted:
            record["train_top1"] = 100.0 * float(totals[1]) / count
        return {**record, "train_images_per_s": count / seconds, "epoch_seconds": seconds}

    def _gradient_sync(self, last: bool) -> AbstractContextManager[Any]:
        """DDP's all-reduce of the gradients runs on the last batch of an accumulated step only."""
        if last or not isinstance(self.network, nn.parallel.DistributedDataParallel):
            return nullcontext()
        return self.network.no_sync()

    def _optimizer_step(self) -> None:
        for parameter, multiplier in self.gradient_multipliers:  # RepOpt: the multi-branch block's gradients
            if parameter.grad is not None:
                parameter.grad.mul_(multiplier)
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _logs_step(self, step: int) -> bool:
        """Whether a line is printed after ``step`` (0-based) when no bar is drawn: every ``log_interval``
        steps and the last step of the epoch, on the main process."""
        if self.log_interval <= 0 or not self.context.is_main:
            return False
        return (step + 1) % self.log_interval == 0 or step + 1 == self.steps_per_epoch

    def _stop_if_not_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if float(all_reduce_sum(bad, self.context)[0]) == 0:
            return
        raise TrainingError(
            f"The loss became {float(loss.detach()):.4g} at epoch {epoch}, step {step + 1}, so training "
            f"stopped; {self._last_good()}: lower `lr` (or use `amp` none) and start a new run from it "
            "(`init`)."
        )

    def _stop_if_diverged(self, metrics: dict[str, Any], epoch: int) -> None:
        """A validation loss that is not finite: the weights diverged, even if the training loss did not."""
        loss = metrics.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise TrainingError(
                f"The validation loss became {loss} after epoch {epoch}: the run diverged, so training "
                f"stopped; {self._last_good()}: lower `lr` and start a new run from it (`init`)."
            )

    def _last_good(self) -> str:
        """Where the last good training state is (the epoch before the one being trained)."""
        kept = (self.output or Path(".")) / STATE_FILE
        where = f"{kept} (epoch {self.start_epoch - 1})" if self.output and kept.is_file() else "none yet"
        return f"the last good checkpoint is kept ({where})"

    def _evaluate(self, model: nn.Module) -> dict[str, Any]:
        was_training = model.training
        try:
            return self.task.evaluate(model)
        finally:
            model.train(was_training)

    def _better(self, score: float, than: float) -> bool:
        return score < than if self.lower_is_better else score > than

    def _patience_spent(self, trained: int) -> bool:
        """Whether ``patience`` epochs have passed since the best one (never before an epoch is scored)."""
        return (
            self.patience is not None
            and self.best_epoch is not None
            and trained - self.best_epoch >= self.patience
        )

    def _keep_checkpoint(self, model: nn.Module, epoch: int, score: float, improved: bool) -> None:
        """``best_file`` for a new best; with ``keep_best`` > 1 also the best K in ``checkpoints/``, ranked in
        ``checkpoints/best.json`` (the ones that drop out of the K are deleted)."""
        assert self.output is not None and self.best_file is not None
        if improved:
            save_checkpoint(model, self.output / self.best_file)
        if self.keep_best <= 1:
            return
        folder = self.output / CHECKPOINT_FOLDER
        ranked = sorted(
            [*self.kept, (score, epoch)],
            key=lambda item: (item[0] if self.lower_is_better else -item[0], item[1]),
        )
        kept, dropped = ranked[: self.keep_best], ranked[self.keep_best :]
        if (score, epoch) in kept:
            folder.mkdir(exist_ok=True)
            save_checkpoint(model, folder / kept_name(epoch))
        for _, old in dropped:
            (folder / kept_name(old)).unlink(missing_ok=True)
        self.kept = kept
        ranking = [{"epoch": e, self.metric: v, "file": kept_name(e)} for v, e in kept]
        write_json(folder / "best.json", ranking, what="the ranking of the kept checkpoints")

    def fit(self) -> list[dict[str, Any]]:
        """Train from :attr:`start_epoch` to ``epochs``; returns the records of the epochs trained now."""
        context = self.context
        writing = context.is_main and self.output is not None
        log = (
            RunLog(self.output, writing, self.start_epoch - 1, self.steps_per_epoch) if self.output else None
        )
        self.log = log
        try:
            for epoch in range(self.start_epoch, self.epochs + 1):
                if self._patience_spent(epoch - 1):
                    break
                record: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
                record.update(self._train_epoch(epoch))
                average_buffers(self.model, context)
                if self.ema is not None:
                    average_buffers(self.ema, context)
                metrics = self._evaluate(self.model)
                self._stop_if_diverged(metrics, epoch)
                record.update({f"val_{k}": v for k, v in metrics.items()})
                scored, scores = self.model, metrics
                if self.ema is not None:
                    scored, scores = self.ema.module, self._evaluate(self.ema.module)
                    record.update({f"ema_val_{k}": v for k, v in scores.items()})
                record["bad_images"] = self.bad_images
                score = scores.get(self.metric)
                improved = score is not None and self._better(score, self.best)
                if improved:
                    self.best, self.best_epoch = score, epoch
                self.records.append(record)
                if writing:
                    assert log is not None and self.output is not None
                    log.epoch(record)
                    if score is not None and self.best_file:
                        self._keep_checkpoint(scored, epoch, score, improved)
                    save_training_state(self.output / STATE_FILE, self._state(epoch), self.model)
                self.start_epoch = epoch + 1
                line = self.task.epoch_line(record, self.epochs)
                if context.is_main and line:
                    print(line, flush=True)
            if self._patience_spent(self.start_epoch - 1) and self.start_epoch <= self.epochs:
                self.stopped_early = self.start_epoch - 1
                if context.is_main:
                    print(
                        f"stopped early after epoch {self.stopped_early}: no better validation "
                        f"{self.metric} for {self.patience} epochs (best {self.best:.4g} at epoch "
                        f"{self.best_epoch})",
                        flush=True,
                    )
            return self.records
        finally:
            if log is not None:
                log.close()


# -- classification: the paper's recipe -----------------------------------------------------------------


class Classification(Task):
    """Cross-entropy (label smoothing, mixup's soft targets), top-1/top-5 on the validation set."""

    def __init__(
        self,
        val_loader: DataLoader[Any],
        context: DistContext,
        *,
        label_smoothing: float = 0.0,
        amp: str = "none",
        channels_last: bool = True,
        on_bad_images: Callable[[list[BadImage]], None] | None = None,
    ) -> None:
        super().__init__(label_smoothing)
        self.val_loader, self.context, self.amp, self.channels_last = val_loader, context, amp, channels_last
        self.on_bad_images = on_bad_images

    def result(self, model: nn.Module) -> EvalResult:
        return evaluate(
            model,
            self.val_loader,
            self.context,
            amp_dtype=AMP_DTYPES[self.amp],
            channels_last=self.channels_last,
            on_bad_images=self.on_bad_images,
        )

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return self.result(model).as_dict()

    def epoch_line(self, record: dict[str, Any], epochs: int) -> str:
        line = (
            f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, "
            f"train top-1 {record['train_top1']:.2f}%, val top-1 {record['val_top1']:.2f}%, "
            f"val top-5 {record['val_top5']:.2f}%, {record['train_images_per_s']:.0f} img/s"
        )
        if "ema_val_top1" in record:
            line += f", EMA val top-1 {record['ema_val_top1']:.2f}%"
        return line


#: Builds the network of a run from its configuration and data (the default: a RepVGG of the registry).
NetworkBuilder = Callable[[TrainConfig, DataBundle], nn.Module]


def build_repvgg(config: TrainConfig, data: DataBundle) -> nn.Module:
    """The run's RepVGG: the named model with the data's classes and channels, strides adapted to its size."""
    if config.layout != "repvgg":
        raise ModelConfigError(
            f"The {config.layout!r} layout is not a RepVGG; its network comes from the study that defines it "
            "(repvgg.studies.ablation for residual_reorg)."
        )
    strides = config.strides or list(strides_for_image_size(data.image_size))
    return create_model(
        config.model,
        num_classes=data.num_classes,
        in_chans=data.in_chans,
        strides=strides,
        use_checkpoint=config.grad_checkpointing,
        block=config.block,
        drop_path_rate=config.drop_path,
    )


class ClassificationRun:
    """One classification run of :class:`TrainConfig`: data, model, optimizer and schedule for the one
    :class:`Trainer`, then the final model in both forms. Construct, maybe :meth:`resume`, then :meth:`run`.
    """

    def __init__(
        self, config: TrainConfig, context: DistContext, build_network: NetworkBuilder = build_repvgg
    ) -> None:
        config.validate()
        self.config, self.context, self.output = config, context, Path(config.output)
        if config.sync_bn and context.device.type != "cuda":
            raise TrainingError(
                "`sync_bn` needs CUDA devices (PyTorch's SyncBatchNorm runs only on GPUs); drop it on CPUs."
            )
        _seed_everything(config.seed + context.rank)  # DDP gives every rank rank 0's initial weights
        augmentation = Augmentation(
            config.augment, config.augment_magnitude, config.random_erasing, config.interpolation
        )
        self.data = build_data(
            config.data,
            config.data_dir,
            image_size=config.image_size,
            augmentation=augmentation,
            crop_pct=config.crop_pct,
            train_subset=config.train_subset,
            val_subset=config.val_subset,
            seed=config.seed,
            rank=context.rank,
            world_size=context.world_size,
            batch_size=config.batch_size,
        )
        self.loaded: str | None = None  # what the `init` checkpoint gave, said in the header
        self.model = self._build_model(build_network)
        workers = config.workers if config.workers is not None else default_workers(self.data)
        self.workers = workers
        loader = self._train_loader(workers)
        self.effective_batch = config.batch_size * context.world_size * config.accum_steps
        self.lr = config.lr if config.lr is not None else default_lr(config.opt, self.effective_batch)
        if config.min_lr >= self.lr:
            raise TrainingError(f"`min_lr` {config.min_lr:g} must be below the learning rate {self.lr:g}.")
        groups = parameter_groups(
            self.model,
            config.weight_decay,
            config.custom_l2,
            head_lr=self.lr * config.head_lr_mult if config.head_lr_mult != 1 else None,
        )
        optimizer = build_optimizer(
            config.opt, groups, self.lr, momentum=config.momentum, nesterov=config.nesterov
        )
        steps = len(loader) // config.accum_steps
        schedule = LRSchedule(
            config.epochs * steps,
            round(config.warmup_epochs * steps),
            shape=config.sched,
            power=config.poly_power,
            min_factor=config.min_lr / self.lr,
            step_every=max(1, round(config.decay_epochs * steps)),
            decay_rate=config.decay_rate,
        )
        mixing = batch_mixing(
            self.data.num_classes, config.mixup, config.cutmix, config.mixup_prob, config.mixup_switch_prob
        )
        self.task = Classification(
            eval_loader(self.data.val, config.batch_size, workers, context),
            context,
            label_smoothing=config.label_smoothing,
            amp=config.amp,
            channels_last=config.channels_last,
        )
        # RepOpt blocks start as their multi-branch block would (unless loaded) and take its gradients.
        scales = self._repopt_scales(config.repopt_scales or DEFAULT_SCALE_RULE)
        multipliers = repopt_multipliers(self.model, initialize=not config.init, scales=scales)
        self.trainer = Trainer(
            self.model,
            loader,
            self.task,
            optimizer,
            schedule,
            epochs=config.epochs,
            context=context,
            output=self.output,
            best_file=BEST_FILE,
            amp=config.amp,
            channels_last=config.channels_last,
            ema_decay=config.ema_decay,
            mixup=mixing,
            regularizer=self._custom_l2 if config.custom_l2 else None,
            skip_bad_images=config.skip_bad_images,
            seed=config.seed,
            progress=config.progress,
            log_interval=config.log_interval,
            accum_steps=config.accum_steps,
            clip_grad=config.clip_grad,
            keep_best=config.keep_best,
            best_metric=config.best_metric,
            patience=config.patience,
            gradient_multipliers=multipliers,
        )
        self.task.on_bad_images = (
            self.trainer.report_bad
        )  # unreadable validation images count like training ones

    def _repopt_scales(self, source: str) -> dict[str, BranchScales]:
        """The branch scales of the RepOpt blocks: a rule's (:data:`SCALE_RULES`), or those an online run
        learned (its checkpoint)."""
        if source in SCALE_RULES:
            return rule_scales(self.model, source)
        return searched_scales(self.model, read_checkpoint(source).state_dict)

    def _custom_l2(self) -> torch.Tensor:
        return 0.5 * self.config.weight_decay * custom_l2_loss(self.model)

    def _build_model(self, build_network: NetworkBuilder) -> nn.Module:
        config = self.config
        model = build_network(config, self.data)
        if isinstance(model, RepVGG):
            model.class_names = self.data.class_names
            model.preprocessing = self.data.preprocessing
        if config.init:
            self.loaded = self._load_initial_weights(model)
        if isinstance(model, RepVGG):
            model.freeze_stages(config.frozen_stages)
        if config.sync_bn and self.context.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.context.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _load_initial_weights(self, model: nn.Module) -> str:
        """Start from the `init` checkpoint; returns what was loaded and replaced (for the header). Weights
        that are not finite are named now, not found as a diverged loss later."""
        if isinstance(model, RepVGG):
            done = self._load_into_repvgg(model)
        else:
            load_checkpoint(self.config.init, model=model, adapt_in_chans=True)  # type: ignore[arg-type]
            done = f"loaded {self.config.init}"
        refuse_nonfinite(model, str(self.config.init), TrainingError)
        return done

    def _load_into_repvgg(self, model: RepVGG) -> str:
        """`init` into ``model``; a checkpoint of another design into blocks that train one convolution
        (online, repopt) goes through a twin of its own design, whose blocks they then start from (the same
        function in eval mode)."""
        init, finetune = str(self.config.init), self.config.finetune
        blocks = [b for b in model.modules() if isinstance(b, RepVGGBlock)]
        if not all(trains_one_conv(b) for b in blocks):
            return load_pretrained(init, model, replace_head=finetune)
        recorded = (read_checkpoint(init).config or {}).get("block", "repvgg")
        if recorded == model.block:
            return load_pretrained(init, model, replace_head=finetune)
        twin = RepVGG(**{**model.config, "block": recorded})
        done = load_pretrained(init, twin, replace_head=finetune)
        start_merged_from(twin, model)
        return (
            f"{done}; its {recorded} blocks merged into {model.block} blocks (the same function in eval mode)"
        )

    def _train_loader(self, workers: int) -> DataLoader[Any]:
        """The training batches of this process: a map-style set through a (distributed) sampler, shards and
        streams split among processes and workers by themselves (see ``build_data``)."""
        config, context, train = self.config, self.context, self.data.train
        streamed = isinstance(train, IterableDataset)
        if not streamed and len(train) < config.batch_size * context.world_size:  # type: ignore[arg-type]
            raise DataError(
                f"The training set has {len(train)} images, fewer than one global batch of "  # type: ignore[arg-type]
                f"{config.batch_size * context.world_size}; lower `batch_size` or raise `train_subset`."
            )
        sampler = None
        if context.distributed and not streamed:
            sampler = DistributedSampler(
                train, context.world_size, context.rank, shuffle=True, seed=config.seed, drop_last=True
            )
        return DataLoader(
            train,
            batch_size=config.batch_size,
            shuffle=sampler is None and not streamed,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_reporting_bad,
            drop_last=True,
            generator=torch.Generator(),
            persistent_workers=False,
            pin_memory=context.device.type == "cuda",
        )

    def resume(self) -> None:
        self.trainer.resume()

    def _best_epoch(self) -> int | None:
        """The epoch with the best `best_metric` (of the EMA when used), from the whole run's metrics (a run
        resumed from an earlier release's state too)."""
        if self.trainer.best_epoch is not None:
            return self.trainer.best_epoch
        path = self.output / "metrics.jsonl"
        if not path.is_file():
            return None
        key = ("ema_val_" if self.config.ema_decay is not None else "val_") + self.config.best_metric
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        scored = [r for r in records if isinstance(r.get(key), int | float)]
        sign = 1 if self.config.best_metric == "loss" else -1
        return min(scored, key=lambda r: sign * r[key])["epoch"] if scored else None

    def resolved_config(self) -> TrainConfig:
        """The configuration with every value the run chose filled in (learning rate, strides, image size,
        device, workers): what ``config.json`` holds, so that it repeats this very run."""
        config = self.config
        return dataclasses.replace(
            config,
            lr=self.lr,
            strides=list(config.strides or strides_for_image_size(self.data.image_size)),
            image_size=self.data.image_size,
            device=str(self.context.device.type),
            workers=self.workers,
            data_dir=dataset_folder(config.data, config.data_dir),
            crop_pct=config.crop_pct if config.crop_pct is not None else default_crop_pct(config.data),
        )

    def header(self) -> str:
        """What the run is about to do, in a few lines (printed at the start)."""
        config, resolved, data = self.config, self.resolved_config(), self.data
        parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        start = [self.loaded] if self.loaded else []
        if config.frozen_stages >= 0:
            frozen = config.frozen_stages
            start.append(f"stage{' 0' if frozen == 0 else f's 0-{frozen}'} frozen")
        if config.head_lr_mult != 1:
            start.append(f"head learning rate x{config.head_lr_mult:g}")
        if config.accum_steps > 1:
            start.append(f"gradients of {config.accum_steps} batches accumulated per optimizer step")
        fine_tuning = "\n" + "; ".join(start) if start else ""
        fine_tuning += "".join(f"\nnote: {note}" for note in data.notes)
        return (
            f"{config.model} ({config.block} blocks, {parameters:,} trainable parameters) on {config.data}: "
            f"{len(data.train):,} training / {len(data.val):,} validation images, "  # type: ignore[arg-type]
            f"{data.image_size} px, {data.num_classes} classes, strides {tuple(resolved.strides or ())}\n"
            f"{config.epochs} epochs, batch {config.batch_size} x {self.context.world_size} process(es) x "
            f"{config.accum_steps} = effective batch {self.effective_batch}, {config.opt} lr {self.lr:g}"
            f"{f' ({lr_rule(config.opt)})' if config.lr is None else ''}, {config.sched} schedule, device "
            f"{device_name(self.context.device)}, {self.workers} data workers; writing to {self.output}"
            f"{fine_tuning}"
        )

    def run(self) -> dict[str, Any]:
        """Train, then evaluate the final model in both forms, check they agree, and save both."""
        started = time.perf_counter()
        if self.context.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            saved = self.resolved_config().as_saved()
            write_json(self.output / "config.json", saved, what="the run's configuration")
            print(self.header(), flush=True)
        self.trainer.fit()
        return self._finish(time.perf_counter() - started)

    def _finish(self, seconds: float) -> dict[str, Any]:
        trainer, task = self.trainer, self.task
        task.on_bad_images = None  # the validation set's unreadable images were counted in every epoch
        final: nn.Module = trainer.ema.module if trainer.ema is not None else self.model
        identical = ranks_agree(final, self.context)
        final.eval()
        trained = task.result(final)
        summary: dict[str, Any] = {
            "model": self.config.model,
            "block": self.config.block,
            "layout": self.config.layout,
            "data": self.config.data,
            "epochs": self.config.epochs,
            "weights": "ema" if trainer.ema is not None else "last",
            "train_form": {**trained.as_dict(), "images": trained.images},
            "deploy_form": None,
            "top1_difference": None,
            "forms_agree": None,
            "bad_images_skipped": trainer.bad_images,
            "processes": self.context.world_size,
            "ranks_hold_identical_weights": identical,
            "best_epoch": self._best_epoch(),
            "best": None,
            "stopped_early_after_epoch": trainer.stopped_early,
            "wall_seconds": seconds,
            "environment": environment(self.context.device),
        }
        deployed_model = reparameterize(final) if is_convertible(final) else None
        if deployed_model is not None:  # the relu_in_branch block and the residual layout have no plain form
            deployed = task.result(deployed_model)
            summary["deploy_form"] = {**deployed.as_dict(), "images": deployed.images}
            summary["top1_difference"] = abs(trained.top1 - deployed.top1)
            summary["forms_agree"] = (
                abs(trained.top1 - deployed.top1) <= 0.01 and abs(trained.top5 - deployed.top5) <= 0.01
            )
        if self.context.is_main:
            save_checkpoint(final, self.output / "model_train.safetensors")
            if deployed_model is not None:
                save_checkpoint(deployed_model, self.output / "model_deploy.safetensors")
            summary["best"] = self._save_best_deploy_form(final)
            write_json(self.output / "summary.json", summary, what="the run's summary")
            figures = {f"train_form_{k}": v for k, v in summary["train_form"].items()}
            figures.update({f"deploy_form_{k}": v for k, v in (summary["deploy_form"] or {}).items()})
            write_hparams(self.output, self.resolved_config().as_saved(), figures)
        return summary

    def _save_best_deploy_form(self, final: nn.Module) -> dict[str, Any] | None:
        """The best checkpoint converted to ``best_deploy.safetensors`` and checked against it in float64
        (a run whose best cannot be converted, the residual baseline's, keeps the training form only)."""
        trained = self.output / BEST_FILE
        if not trained.is_file():
            return None
        best: dict[str, Any] = {
            "epoch": self.trainer.best_epoch,
            "metric": ("ema_val_" if self.trainer.ema is not None else "val_") + self.trainer.metric,
            "value": self.trainer.best if math.isfinite(self.trainer.best) else None,
            "train_form": BEST_FILE,
            "deploy_form": None,
        }
        if not is_convertible(final):
            return best
        model = load_checkpoint(trained, model=copy.deepcopy(final))
        save_checkpoint(reparameterize(model.eval()), self.output / BEST_DEPLOY_FILE)
        report = verify_checkpoints(trained, self.output / BEST_DEPLOY_FILE)
        if not report.passed:
            raise TrainingError(
                f"The converted best checkpoint differs from {trained} ({report}); keep {trained} and "
                f"convert it with `repvgg convert` to see why."
            )
        best.update(deploy_form=BEST_DEPLOY_FILE, max_abs_error=report.max_abs_error)
        return best


BEST_FILE = "best_train.safetensors"
BEST_DEPLOY_FILE = "best_deploy.safetensors"

#: The files of a run folder (a classification or a segmentation run); a folder holding any of them is a run.
RUN_FILES = (
    STATE_FILE,
    "config.json",
    "metrics.jsonl",
    "summary.json",
    BEST_FILE,
    BEST_DEPLOY_FILE,
    CHECKPOINT_FOLDER,
    "model_train.safetensors",
    "model_deploy.safetensors",
    "pspnet_train.safetensors",
    "pspnet_deploy.safetensors",
)


def check_run_folder(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output that is a file, a folder that cannot be written, a run folder about to be replaced
    without ``overwrite``, and resuming where there is nothing to resume.

    A run stopped before its first checkpoint (its ``config.json`` written, no ``last.pt``, no epoch
    recorded) can be resumed: it starts from epoch 1 with its configuration (see :func:`prepare_run`)."""
    found = [name for name in RUN_FILES if (output / name).exists()]
    if resume and overwrite:
        raise TrainingError(
            "`resume` continues the run in `output` and `overwrite` replaces it: give one of them."
        )
    if resume:
        if not (output / "config.json").is_file():
            raise TrainingError(
                f"Nothing to resume in {output}: it has no config.json; start without `resume`."
            )
        if not (output / STATE_FILE).is_file():
            epochs = _recorded_epochs(output / "metrics.jsonl")
            results = [n for n in found if n not in (STATE_FILE, "config.json", "metrics.jsonl")]
            if epochs or results:
                held = ", ".join([f"metrics of {epochs} epoch(s)"] * bool(epochs) + results)
                raise TrainingError(
                    f"{output} holds {held} but no {STATE_FILE} to continue from; start the run again there "
                    "(`overwrite`, without `resume`), or choose another `output`."
                )
    elif found and not overwrite:
        raise TrainingError(
            f"{output} already holds a run ({', '.join(found)}); continue it (`resume`), or choose another "
            "`output`, or replace it (`overwrite`)."
        )
    output_folder(output, TrainingError)


def _recorded_epochs(metrics: Path) -> int:
    """How many epoch records ``metrics.jsonl`` holds (0 when there is none)."""
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.strip())


def run_lock(output: str | Path) -> AbstractContextManager[Any]:
    """The run folder's lock (:func:`repvgg.io.files.folder_lock`), held by the one process that writes it
    (rank 0 under torchrun): a second run started on the same folder is refused in one sentence."""
    if os.environ.get("RANK", "0") != "0":
        return nullcontext()
    return folder_lock(output, "this run", TrainingError)


def prepare_run(config: Config, resume: bool) -> tuple[Config, bool]:
    """The configuration a run goes on with, and whether it continues from a saved state: the one rule of
    ``repvgg train`` and ``repvgg train-seg``.

    The folder is checked (:func:`check_run_folder`). On ``resume`` the saved ``config.json`` holds the run's
    own values: a change outside the configuration's ``RESUMABLE`` fields is refused, a value left to the run
    (None) is the saved one. A run stopped before its first checkpoint has nothing to continue from: it is
    started from epoch 1 with its saved configuration, and says so."""
    config.validate()
    output = Path(config.output)
    check_run_folder(output, resume=resume, overwrite=config.overwrite)
    if not resume:
        return config, False
    config = config.resumed(load_run_config(output / "config.json", saved_run=True))
    config.validate()
    continues = (output / STATE_FILE).is_file()
    if not continues and os.environ.get("RANK", "0") == "0":
        print(
            f"note: {output} stopped before its first checkpoint (no {STATE_FILE}): starting it from epoch 1 "
            "with its config.json",
            flush=True,
        )
    return config, continues


def train(
    config: TrainConfig, *, resume: bool = False, build_network: NetworkBuilder = build_repvgg
) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) a classification run; returns the final summary.

    Everything is checked before any work starts. A folder that holds any file of a run is never replaced
    without ``config.overwrite``. On ``resume`` the configuration must be the run's own, except for
    :data:`~repvgg.engine.config.RESUMABLE_CHANGES`: more (or fewer) ``epochs`` stretch the cosine schedule
    over the new total from the step reached, and ``config.json`` records the new count.
    ``build_network`` builds a network other than a registry RepVGG (the ablation's residual baseline)."""
    with run_lock(config.output):
        config, continues = prepare_run(config, resume)
        context = init_distributed(config.device)
        try:
            run = ClassificationRun(config, context, build_network)
            if continues:
                run.resume()
            return run.run()
        finally:
            shutdown()
