"""PSPNet over a RepVGG backbone (the paper's Table 8), and the mean IoU it is judged by.

The backbone is a :class:`~repvgg.backbone.RepVGGFeatures` with output stride 8 (dilated last stages);
the pyramid pooling module pools its last feature map into 1x1, 2x2, 3x3 and 6x6 bins, and an optional
auxiliary head on stage 3 adds a second loss while training. :func:`repvgg.reparameterize` converts the
whole segmenter in one call: only the backbone's blocks change.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from repvgg.core.reparam import refuse_nonfinite, reparameterize
from repvgg.core.segmentation import PSPNet, pspnet
from repvgg.engine.config import DATASETS, SegTrainConfig
from repvgg.engine.data import dataset_folder
from repvgg.engine.distributed import DistContext
from repvgg.engine.evaluation import check_results_file, csv_field
from repvgg.engine.recipe import LRSchedule
from repvgg.engine.segmentation_data import IGNORE_INDEX, build_segmentation_data
from repvgg.engine.training import Task, Trainer, prepare_run, run_lock
from repvgg.exceptions import DataError, TrainingError
from repvgg.io.checkpoints import file_kind, load_checkpoint, read_checkpoint, require_kind, save_checkpoint
from repvgg.io.files import PathLike, atomic_write, writable_or_raise
from repvgg.io.jsonfile import write_json
from repvgg.runtime.device import device_name, resolve_device
from repvgg.runtime.measure import time_interleaved
from repvgg.runtime.progress import progress_bar


def confusion_matrix(
    predictions: Tensor, targets: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Pixel counts per (true class, predicted class), ignoring pixels labelled ``ignore_index``."""
    keep = targets != ignore_index
    pairs = targets[keep].long() * num_classes + predictions[keep].long()
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(confusion: Tensor) -> list[float | None]:
    """Intersection / union of each class in percent; None for a class absent from truth and prediction."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return [float(i / u * 100) if u > 0 else None for i, u in zip(intersection, union, strict=True)]


def mean_iou(confusion: Tensor) -> float:
    """Mean over the classes present (in truth or prediction) of intersection / union, in percent."""
    present = [iou for iou in class_iou(confusion) if iou is not None]
    return sum(present) / len(present) if present else 0.0


@torch.inference_mode()
def evaluate_forms(
    forms: Mapping[str, nn.Module], loader: DataLoader[Any], num_classes: int
) -> tuple[dict[str, dict[str, Any]], int]:
    """mIoU, pixel accuracy and the IoU of each class (percent) of every model in ``forms``, in one pass
    over ``loader``; and how many pixels the models do not all label alike (0 for exact conversions)."""
    confusions = {name: torch.zeros(num_classes, num_classes, dtype=torch.long) for name in forms}
    disagreeing = 0
    weight = next(next(iter(forms.values())).parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        predictions = {name: model.eval()(images).argmax(1).cpu() for name, model in forms.items()}
        masks = masks.cpu()
        first = next(iter(predictions.values()))
        disagreeing += int(torch.stack([p != first for p in predictions.values()]).any(0).sum())
        for name, predicted in predictions.items():
            confusions[name] += confusion_matrix(predicted, masks, num_classes)
    metrics = {
        name: {
            "miou": mean_iou(confusion),
            "pixel_accuracy": float(confusion.diagonal().sum() / confusion.sum().clamp_min(1) * 100),
            "class_iou": class_iou(confusion),
        }
        for name, confusion in confusions.items()
    }
    return metrics, disagreeing


def evaluate_segmentation(model: nn.Module, loader: DataLoader[Any], num_classes: int) -> dict[str, Any]:
    """mIoU, pixel accuracy and the IoU of each class (percent) of ``model`` on ``loader``."""
    return evaluate_forms({"model": model}, loader, num_classes)[0]["model"]


@torch.inference_mode()
def time_both_forms(model: nn.Module, deployed: nn.Module, images: Tensor) -> dict[str, float]:
    """Images/s of the training-time and the deployed segmenter on one batch, timed interleaved."""
    measured = time_interleaved({"train_form": model, "deploy_form": deployed}, images, rounds=20)
    return {
        "batch": len(images),
        "train_form_images_per_s": measured["train_form"].images_per_s,
        "deploy_form_images_per_s": measured["deploy_form"].images_per_s,
    }


class Segmentation(Task):
    """PSPNet's loss (cross-entropy of the main head, plus ``aux_weight`` x the auxiliary head's while
    training; pixels labelled ignore are left out) and its validation metrics (mIoU, pixel accuracy)."""

    primary = "miou"

    def __init__(self, val_loader: DataLoader[Any], num_classes: int, aux_weight: float) -> None:
        super().__init__()
        self.val_loader, self.num_classes, self.aux_weight = val_loader, num_classes, aux_weight

    def loss(self, outputs: Any, targets: Tensor) -> Tensor:
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        if aux is not None:
            loss = loss + self.aux_weight * F.cross_entropy(aux, targets, ignore_index=IGNORE_INDEX)
        return loss

    def correct(self, outputs: Any, targets: Tensor) -> float | None:
        return None

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return evaluate_segmentation(model, self.val_loader, self.num_classes)

    def epoch_line(self, record: dict[str, Any], epochs: int) -> str:
        return (
            f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, "
            f"val mIoU {record['val_miou']:.2f}%, pixel accuracy {record['val_pixel_accuracy']:.2f}%, "
            f"{record['train_images_per_s']:.0f} img/s"
        )


def train_segmentation(config: SegTrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train PSPNet-RepVGG with SGD and the poly schedule (the one Trainer), then convert it and evaluate
    both forms. The run folder follows :func:`repvgg.engine.training.prepare_run`, as ``repvgg train``'s:
    ``config.json`` holds every resolved value, ``resume`` continues with the run's own settings."""
    with run_lock(config.output):
        return _train_segmentation(config, resume)


def _train_segmentation(config: SegTrainConfig, resume: bool) -> dict[str, Any]:
    config, continues = prepare_run(config, resume)
    if config.backbone_weights is not None:
        require_kind(config.backbone_weights, ("classifier",), "a PSPNet's backbone", TrainingError)
        if read_checkpoint(config.backbone_weights).form != "train":
            raise TrainingError(
                f"{config.backbone_weights} is a deploy-form (converted) checkpoint; a PSPNet's backbone "
                "trains from a training-form one (e.g. model_train.safetensors)."
            )
    output = Path(config.output)
    device = resolve_device(config.device, TrainingError)
    torch.manual_seed(config.seed)
    bundle = build_segmentation_data(
        config.data,
        config.data_dir,
        num_classes=config.num_classes,
        image_size=config.image_size,
        train_subset=config.train_subset,
        val_subset=config.val_subset,
        seed=config.seed,
    )
    model = pspnet(
        config.model,
        bundle.num_classes,
        in_chans=bundle.in_chans,
        output_stride=config.output_stride,
        dilation_mode=config.dilation_mode,
        head_channels=config.head_channels,
        aux_weight=config.aux_weight,
    )
    model.class_names, model.preprocessing = bundle.class_names, bundle.preprocessing
    loaded = None
    if config.backbone_weights is not None:
        load_checkpoint(config.backbone_weights, model.backbone, adapt_in_chans=True)
        refuse_nonfinite(model.backbone, config.backbone_weights, TrainingError)
        loaded = f"backbone loaded from {config.backbone_weights}"
    model = model.to(device)
    train_loader = DataLoader(
        bundle.train,
        config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator(),
        num_workers=config.workers,
    )
    val_loader = DataLoader(bundle.val, config.batch_size, num_workers=config.workers)
    if len(train_loader) == 0:
        raise TrainingError(
            f"The training set has {len(bundle.train)} images, fewer than one batch of "  # type: ignore[arg-type]
            f"{config.batch_size}; lower `batch_size` or raise `train_subset`."
        )
    resolved = dataclasses.replace(
        config,
        data_dir=dataset_folder(config.data, config.data_dir),
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
        device=device.type,
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
    )
    trainer = Trainer(
        model,
        train_loader,
        Segmentation(val_loader, bundle.num_classes, config.aux_weight),
        optimizer,
        LRSchedule(config.epochs * len(train_loader), shape="poly"),
        epochs=config.epochs,
        context=DistContext(device=device),
        output=output,
        seed=config.seed,
        progress=config.progress,
        log_interval=config.log_interval,
    )
    if continues:
        trainer.resume()  # before anything is written: a resume it refuses changes nothing
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "config.json", resolved.as_saved(), what="the run's configuration")
    print(_header(config, bundle, model, device, loaded), flush=True)
    trainer.fit()
    deployed_model = reparameterize(model.eval())
    forms, changed = evaluate_forms(
        {"train_form": model, "deploy_form": deployed_model}, val_loader, bundle.num_classes
    )
    trained, deployed = forms["train_form"], forms["deploy_form"]
    summary = {
        "model": config.model,
        "data": config.data,
        "epochs": config.epochs,
        "class_names": bundle.class_names,
        "train_form": trained,
        "deploy_form": deployed,
        "miou_identical": trained["miou"] == deployed["miou"],
        "changed_pixels": changed,
        "speed": time_both_forms(model, deployed_model, next(iter(val_loader))[0].to(device)),
    }
    save_checkpoint(model, output / "pspnet_train.safetensors")
    save_checkpoint(deployed_model, output / "pspnet_deploy.safetensors")
    write_json(output / "summary.json", summary, what="the run's summary")
    return summary


def _header(
    config: SegTrainConfig, bundle: Any, model: PSPNet, device: torch.device, loaded: str | None
) -> str:
    """What a segmentation run is about to do, in a few lines (printed at the start, as train's)."""
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (
        f"PSPNet over {config.model} ({parameters:,} trainable parameters, output stride "
        f"{config.output_stride}, {config.dilation_mode} dilation) on {config.data}: "
        f"{len(bundle.train):,} training / {len(bundle.val):,} validation images, {bundle.image_size} px, "
        f"{bundle.num_classes} classes\n{config.epochs} epochs, batch {config.batch_size}, lr {config.lr:g} "
        f"(poly), device {device_name(device)}, {config.workers} data workers; writing to {config.output}"
        + (f"\n{loaded}" if loaded else "")
    )


def evaluate_segmentation_checkpoint(
    checkpoint: PathLike,
    *,
    data: str = "fashion-mnist-seg",
    data_dir: str | None = None,
    batch_size: int = 16,
    val_subset: int | None = None,
    image_size: int | None = None,
    device: str | None = None,
    workers: int = 0,
    results_file: PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and each class's IoU of a saved PSPNet (either form) on a segmentation set's
    validation split, with images/s; written to ``results_file`` (``.json``, or ``.csv`` with a row per
    class) when given. Images are prepared at the size the checkpoint records unless ``image_size``."""
    if results_file is not None:
        check_results_file(Path(results_file))
        writable_or_raise(results_file, DataError)
    if file_kind(checkpoint) != "classifier":  # a classifier is told below what to evaluate it on
        require_kind(checkpoint, ("segmenter",), "segmentation", DataError)
    model = load_checkpoint(checkpoint)
    if not isinstance(model, PSPNet):
        raise DataError(
            f"{checkpoint} is a classifier, not a PSPNet: evaluate it on a classification dataset "
            f"(`data` {', '.join(DATASETS)})."
        )
    refuse_nonfinite(model, str(checkpoint), DataError)
    recorded = model.preprocessing.image_size if model.preprocessing else None
    bundle = build_segmentation_data(
        data,
        data_dir,
        num_classes=model.num_classes if data == "folder" else None,
        image_size=image_size or recorded,
        val_subset=val_subset,
    )
    if (bundle.num_classes, bundle.in_chans) != (model.num_classes, model.backbone.in_chans):
        raise DataError(
            f"{checkpoint} segments {model.num_classes} classes of {model.backbone.in_chans}-channel images "
            f"but {data} has {bundle.num_classes} classes of {bundle.in_chans}-channel images: evaluate it "
            "on the dataset it was trained on."
        )
    target = resolve_device(device, DataError)
    model = model.eval().to(target)
    loader = DataLoader(bundle.val, batch_size, num_workers=workers)
    start = time.perf_counter()
    metrics = evaluate_forms(
        {"model": model}, progress_bar(loader, desc="eval", enabled=progress), bundle.num_classes
    )[0]["model"]
    seconds = time.perf_counter() - start
    images = len(bundle.val)  # type: ignore[arg-type]
    result = {
        "checkpoint": str(checkpoint),
        "data": data,
        "image_size": bundle.image_size,
        "images": images,
        "images_per_s": images / seconds,
        "class_names": bundle.class_names,
        **metrics,
    }
    if results_file is not None:
        _write_segmentation_results(result, Path(results_file))
    return result


def _write_segmentation_results(result: dict[str, Any], path: Path) -> None:
    what = "the evaluation results"
    if path.suffix == ".json":
        write_json(path, result, what=what, error_type=DataError)
        return
    lines = ["class,iou"]
    for name, iou in zip(result["class_names"], result["class_iou"], strict=True):
        lines.append(f"{csv_field(name)},{'' if iou is None else f'{iou:.4f}'}")
    lines += [f"mean,{result['miou']:.4f}", f"pixel_accuracy,{result['pixel_accuracy']:.4f}"]
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda target: target.write_text(text), what=what, error_type=DataError)
