"""Prediction on image files: top-k classes with the class names and preprocessing saved in the checkpoint."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from repvgg.core.info import MAX_IMAGE_SIZE, PREPROCESSING_PRESETS, Preprocessing, model_info
from repvgg.core.int8 import QuantizedRepVGG
from repvgg.core.reparam import refuse_nonfinite
from repvgg.core.segmentation import PSPNet
from repvgg.exceptions import DataError, InferenceError
from repvgg.io.checkpoints import load_checkpoint, require_kind
from repvgg.io.files import PathLike, atomic_write, output_folder, writable_or_raise
from repvgg.io.images import BadImage, open_image
from repvgg.io.jsonfile import write_json
from repvgg.runtime.device import resolve_device
from repvgg.runtime.optimize import OptimizedModel, optimize, recorded_runtime
from repvgg.runtime.progress import progress_bar


@dataclass(frozen=True)
class Prediction:
    """The ``topk`` most likely classes of one image, most likely first, as (label, probability)."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)


def resolve_preprocessing(model: nn.Module, preset: str | None = None) -> Preprocessing:
    """The preprocessing saved with the model, unless a preset (a dataset name) is asked for."""
    info = model_info(model)
    if preset is not None:
        if preset not in PREPROCESSING_PRESETS:
            raise DataError(
                f"Unknown preprocessing {preset!r}: choose one of {', '.join(PREPROCESSING_PRESETS)}."
            )
        chosen = PREPROCESSING_PRESETS[preset]
    else:
        chosen = info.preprocessing or PREPROCESSING_PRESETS["imagenet"]
    if chosen.in_chans != info.in_chans:
        raise DataError(
            f"The model takes {info.in_chans}-channel images but the preprocessing "
            f"{'asked for' if preset else 'assumed (the checkpoint records none)'} has {chosen.in_chans}; "
            f"give `preprocessing` as one of {', '.join(PREPROCESSING_PRESETS)}."
        )
    return chosen


class _ImageFiles(Dataset[tuple[str, Any]]):
    """Image files as model inputs, read in the loader's workers; an unreadable one is its BadImage."""

    def __init__(self, paths: Sequence[PathLike], in_chans: int, transform: Callable[[Any], Any]) -> None:
        self.paths, self.in_chans, self.transform = [str(p) for p in paths], in_chans, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        image = open_image(self.paths[index], self.in_chans)
        return self.paths[index], image if isinstance(image, BadImage) else self.transform(image)


def predict(
    source: PathLike | nn.Module,
    images: Sequence[PathLike],
    *,
    topk: int = 5,
    batch_size: int = 32,
    backend: str | None = None,
    preprocessing: str | None = None,
    image_size: int | None = None,
    device: str | None = None,
    workers: int = 0,
    progress: bool = False,
    on_backend: Callable[[OptimizedModel], None] | None = None,
) -> tuple[list[Prediction], list[BadImage]]:
    """Top-k classes of each readable image, in batches; unreadable images are returned, not raised.

    ``source`` is a checkpoint (any format the package reads) or a model. Class names and the
    preprocessing come from the checkpoint; ``preprocessing`` names a preset to use instead, and
    ``image_size`` another crop size. ``workers`` processes read and prepare the images. Without
    ``backend`` the model runs as ``repvgg optimize`` recorded in it, else eagerly.
    ``on_backend`` is told which backend runs the model (with the timings ``auto`` compared) once it is built.
    """
    if topk < 1 or batch_size < 1 or workers < 0:
        raise InferenceError("`topk` and `batch_size` must be at least 1, and `workers` at least 0.")
    if not isinstance(source, nn.Module):
        require_kind(source, ("classifier", "int8", "onnx"), "classification", InferenceError)
    model = load_checkpoint(source) if not isinstance(source, nn.Module) else source
    refuse_nonfinite(model, str(source) if not isinstance(source, nn.Module) else "The model", InferenceError)
    info = model_info(model)
    chosen = resolve_preprocessing(model, preprocessing)
    if image_size is not None:
        if not 8 <= image_size <= MAX_IMAGE_SIZE:
            raise InferenceError(f"`image_size` must be from 8 to {MAX_IMAGE_SIZE}, got {image_size}.")
        chosen = chosen.at_size(image_size)
    default = "cuda" if torch.cuda.is_available() and not isinstance(model, QuantizedRepVGG) else "cpu"
    target = resolve_device(device or default)
    loader = DataLoader(
        _ImageFiles(images, info.in_chans, chosen.transform()),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=list,
    )
    runner: nn.Module | None = None
    predictions: list[Prediction] = []
    bad: list[BadImage] = []
    for chunk in progress_bar(loader, desc="predict", enabled=progress):
        bad += [item for _, item in chunk if isinstance(item, BadImage)]
        good = [(path, item) for path, item in chunk if not isinstance(item, BadImage)]
        if not good:
            continue
        batch = torch.stack([item for _, item in good]).to(target)
        if runner is None:
            way = recorded_runtime(model) if backend is None else None
            chosen, dtype = way or (backend or "eager", torch.float32)
            runner = optimize(model, chosen, example_input=batch, device=target, dtype=dtype)
            if on_backend is not None:
                on_backend(runner)
        with torch.inference_mode():
            probabilities = runner(batch).softmax(dim=1).cpu()
        names = info.class_names or [str(i) for i in range(probabilities.shape[1])]
        values, indices = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
        for (path, _), row_values, row_indices in zip(good, values, indices, strict=True):
            top = [(names[int(i)], float(v)) for v, i in zip(row_values, row_indices, strict=True)]
            predictions.append(Prediction(path, top))
    return predictions, bad


def write_predictions(predictions: Sequence[Prediction], path: PathLike) -> Path:
    """The predictions as ``.csv`` (one row per image: path, then class and probability for each rank) or
    ``.json`` (a list of ``{"path", "top": [{"class", "probability"}]}``), by suffix; written atomically."""
    target = Path(path)
    if target.suffix == ".json":
        rows = [
            {"path": p.path, "top": [{"class": label, "probability": prob} for label, prob in p.top]}
            for p in predictions
        ]
        write_json(target, rows, what="the predictions", error_type=InferenceError)
        return target
    if target.suffix != ".csv":
        raise InferenceError(f"`output` must end in .csv or .json, got {target.name}.")
    ranks = max((len(p.top) for p in predictions), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["path", *(f"{name}_{k}" for k in range(1, ranks + 1) for name in ("class", "probability"))]
    )
    for prediction in predictions:
        writer.writerow(
            [prediction.path, *(v for label, prob in prediction.top for v in (label, f"{prob:.6f}"))]
        )
    text = buffer.getvalue()
    atomic_write(
        target, lambda file: file.write_text(text), what="the predictions", error_type=InferenceError
    )
    return target


def check_predictions_file(path: PathLike) -> None:
    """Refuse, before any work, a predictions file that :func:`write_predictions` could not write."""
    if Path(path).suffix not in (".csv", ".json"):
        raise InferenceError(f"`output` must end in .csv or .json, got {Path(path).name}.")
    writable_or_raise(path, InferenceError)


@dataclass(frozen=True)
class Segmentation:
    """One image's predicted mask (a PNG of class indices, the image's size) and each class's share of it."""

    path: str
    mask: str
    shares: list[tuple[str, float]] = field(default_factory=list)


def segment(
    source: PathLike | nn.Module,
    images: Sequence[PathLike],
    output: PathLike,
    *,
    image_size: int | None = None,
    device: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> tuple[list[Segmentation], list[BadImage]]:
    """Per-pixel classes of each readable image with a PSPNet checkpoint (or model), written as masks.

    Each image is resized so its shorter side is the preprocessing's size (``image_size`` to choose
    another), segmented whole (no crop), and its mask scaled back to the image's own size and saved in
    ``output`` under the name :func:`mask_names` gives it (the image's path below the images' common
    folder, ``<name>_mask.png``): a palette PNG whose pixel values are the class indices. No two images
    share a mask, and a mask file already in ``output`` is refused before any work unless ``overwrite``.
    Unreadable images are returned, not raised.
    """
    from PIL import Image
    from torchvision.transforms import v2

    if not isinstance(source, nn.Module):
        require_kind(source, ("segmenter",), "segmentation", InferenceError)
    unique: dict[Path, PathLike] = {}
    for path in images:  # an image named twice (as a file and in its folder) is one image, one mask
        unique.setdefault(_absolute(path), path)
    images = list(unique.values())
    folder = output_folder(output, InferenceError)
    mask_files = mask_names(images)
    existing = [name for name in mask_files if (folder / name).exists()]
    if existing and not overwrite:
        raise InferenceError(
            f"{folder} already holds {len(existing)} of the masks this would write ({existing[0]}"
            f"{', ...' if len(existing) > 1 else ''}); choose another `output`, or replace them "
            "(`overwrite`)."
        )
    model = load_checkpoint(source) if not isinstance(source, nn.Module) else source
    if not isinstance(model, PSPNet):
        raise InferenceError("`segment` needs a PSPNet checkpoint; classify images with `predict`.")
    refuse_nonfinite(model, str(source) if not isinstance(source, nn.Module) else "The model", InferenceError)
    info = model_info(model)
    chosen = info.preprocessing or PREPROCESSING_PRESETS["imagenet"]
    size = image_size or chosen.image_size
    prepare = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(chosen.mean, chosen.std),
        ]
    )
    target = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.eval().to(target)
    names = info.class_names or [str(i) for i in range(model.num_classes)]
    palette = _palette(len(names))
    results: list[Segmentation] = []
    bad: list[BadImage] = []
    for path, name in progress_bar(
        zip(images, mask_files, strict=True),
        desc="segment",
        unit="image",
        enabled=progress,
        total=len(images),
    ):
        image = open_image(path, info.in_chans)
        if isinstance(image, BadImage):
            bad.append(image)
            continue
        with torch.inference_mode():
            logits = model(prepare(image)[None].to(target))
        labels = logits.argmax(1, keepdim=True).float()
        labels = torch.nn.functional.interpolate(labels, size=image.size[::-1], mode="nearest")[0, 0]
        labels = labels.to(torch.uint8).cpu()
        counts = torch.bincount(labels.flatten().long(), minlength=len(names)).double()
        shares = sorted(
            ((names[i], float(c / counts.sum())) for i, c in enumerate(counts) if c > 0), key=lambda x: -x[1]
        )
        mask = Image.frombytes("P", image.size, labels.numpy().tobytes())
        mask.putpalette(palette)
        mask_path = folder / name
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(mask_path, lambda file, mask=mask: mask.save(file, format="PNG"), what="the mask")
        results.append(Segmentation(str(path), str(mask_path), shares))
    return results, bad


def _absolute(path: PathLike) -> Path:
    """``path`` made absolute and normalised (``a/../b`` is ``b``), links left as they are."""
    return Path(os.path.normpath(Path(path).absolute()))


def mask_names(images: Sequence[PathLike]) -> list[Path]:
    """The mask file of each image, relative to the output folder: the image's path below the common
    folder of all the images, its suffix replaced by ``_mask.png`` (``a/img.png`` and ``b/img.png`` from
    the same folder give ``a/img_mask.png`` and ``b/img_mask.png``). Images of one folder with the same
    stem keep their suffix in the name (``img.png``, ``img.jpg``: ``img_png_mask.png``, ``img_jpg_mask.png``);
    a name still taken gets a number. The names are distinct, one per image, in order."""
    paths = [_absolute(path) for path in images]
    if not paths:
        return []
    common = Path(os.path.commonpath([path.parent for path in paths]))
    relative = [path.relative_to(common) for path in paths]
    stems = Counter((r.parent, r.stem) for r in relative)
    names: list[Path] = []
    taken: set[Path] = set()
    for path in relative:
        stem = path.stem if stems[(path.parent, path.stem)] == 1 else f"{path.stem}_{path.suffix[1:].lower()}"
        name, number = path.parent / f"{stem}_mask.png", 1
        while name in taken:
            number += 1
            name = path.parent / f"{stem}_{number}_mask.png"
        taken.add(name)
        names.append(name)
    return names


def _palette(classes: int) -> list[int]:
    """Distinct colours for class indices (class 0 black), as PIL's flat RGB palette."""
    colours = [0, 0, 0]
    for index in range(1, classes):
        hue = (index * 0.618034) % 1.0  # golden-ratio steps spread the hues
        red, green, blue = (int(255 * _channel(hue, shift)) for shift in (0.0, 1 / 3, 2 / 3))
        colours += [red, green, blue]
    return colours + [0] * (768 - len(colours))


def _channel(hue: float, shift: float) -> float:
    """One channel of a fully saturated colour of ``hue`` (a triangle wave)."""
    position = (hue + shift) % 1.0
    return max(0.0, min(1.0, abs(position * 6 - 3) - 1))
