"""The model-info record: what a model says about itself, the same in memory, in every checkpoint file and in
the training state ``last.pt``.

A record names the model, holds the constructor arguments that rebuild its architecture, the class names and
the preprocessing its inputs need, its form (training, deploy) and its precision (float32, bfloat16, int8).
:func:`model_info` reads it off any network; :meth:`ModelInfo.to_metadata` and :meth:`ModelInfo.from_metadata`
are its one serializer (string values, as safetensors metadata holds them).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from repvgg.core.blocks import form_of
from repvgg.exceptions import CheckpointError, DataError

FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MAX_IMAGE_SIZE = 4096  # larger sizes in a record are damage, not a model's input size
#: How a checkpoint stores its weights; a bfloat16 one (written by ``repvgg optimize``) loads as float32.
PRECISIONS = ("float32", "bfloat16", "int8")
#: How an image is resized (torchvision's InterpolationMode names); records without one are bilinear.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a model input: saved in checkpoints so ``predict`` needs no dataset.

    The image is converted to ``in_chans`` channels (L or RGB), resized so its shorter side is
    ``resize`` (with ``interpolation``), centre-cropped to ``image_size`` and normalised with ``mean`` and
    ``std``. ``image_size / resize`` is the test-time crop ratio (timm's ``crop_pct``: 0.875 for the paper's
    256 -> 224).
    """

    image_size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        sizes_ok = 1 <= self.image_size <= self.resize <= MAX_IMAGE_SIZE
        stats_ok = len(self.mean) == len(self.std) in (1, 3) and all(
            math.isfinite(s) and s > 0 for s in self.std
        )
        if not (sizes_ok and stats_ok and all(math.isfinite(m) for m in self.mean)):
            raise DataError(
                f"The preprocessing {self.as_dict()} is not usable: it needs 1 <= image_size <= resize <= "
                f"{MAX_IMAGE_SIZE} and one finite mean and positive std per channel (1 or 3)."
            )
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(
                f"The preprocessing's interpolation {self.interpolation!r} is none of "
                f"{', '.join(INTERPOLATIONS)}."
            )

    @property
    def crop_pct(self) -> float:
        """The test-time crop ratio: the crop's side over the resized shorter side."""
        return self.image_size / self.resize

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def transform(self) -> Any:
        """The torchvision v2 transform from a PIL image to a normalised float tensor."""
        import torch
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(
                    self.resize, interpolation=v2.InterpolationMode(self.interpolation), antialias=True
                ),
                v2.CenterCrop(self.image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def at_size(self, image_size: int) -> Preprocessing:
        """The same preprocessing for another crop size, keeping the ratio of resize to crop (256/224)."""
        resize = max(image_size, round(image_size * self.resize / self.image_size))
        return dataclasses.replace(self, image_size=image_size, resize=resize)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        try:
            return cls(
                image_size=_integer(values["image_size"]),
                resize=_integer(values["resize"]),
                mean=tuple(float(m) for m in values["mean"]),
                std=tuple(float(s) for s in values["std"]),
                interpolation=str(values.get("interpolation", "bilinear")),
            )
        except DataError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"The preprocessing record {dict(values)!r} is incomplete: it needs image_size, resize, "
                "mean, std."
            ) from error


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise TypeError(f"{value!r} is not an integer")
    return int(value)


def imagenet_preprocessing(size: int = 224) -> Preprocessing:
    """The paper's evaluation preprocessing: resize to size*8/7 (256 for 224), centre crop."""
    return Preprocessing(size, round(size * 8 / 7), *IMAGENET_STATS)


PREPROCESSING_PRESETS: dict[str, Preprocessing] = {
    "fashion-mnist": Preprocessing(28, 28, *FASHION_MNIST_STATS),
    "cifar10": Preprocessing(32, 32, *CIFAR10_STATS),
    "imagenet": imagenet_preprocessing(),
}


@dataclass(frozen=True)
class ModelInfo:
    """What a model says about itself; every checkpoint this package writes holds one.

    ``config`` holds the :class:`~repvgg.RepVGG` constructor arguments (its ``config`` property), a
    :class:`~repvgg.PSPNet`'s head settings and backbone config, or None for another network (a baseline).
    ``form`` is ``train``, ``deploy``, or ``none`` for a network without RepVGG blocks.
    """

    model_name: str | None = None
    config: dict[str, Any] | None = None
    class_names: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None
    form: str = "train"
    precision: str = "float32"
    module_type: str = "RepVGG"
    #: How ``repvgg optimize`` found the model runs fastest within its accuracy guard on the machine it was
    #: run on: ``{"backend": "inductor", "precision": "bf16"}``; ``eval`` and ``predict`` use it by default.
    runtime: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.form not in ("train", "deploy", "none") or self.precision not in PRECISIONS:
            raise CheckpointError(
                f"The model record says form {self.form!r} and precision {self.precision!r}; it is damaged: "
                "save the model again."
            )
        if self.class_names is not None and self.num_classes and len(self.class_names) != self.num_classes:
            raise CheckpointError(
                f"The model record has {len(self.class_names)} class names for a model with "
                f"{self.num_classes} classes; give one name per class."
            )

    @property
    def num_classes(self) -> int | None:
        return None if self.config is None else int(self.config["num_classes"])

    @property
    def in_chans(self) -> int:
        """Input channels: from the architecture, else from the preprocessing, else 3."""
        if self.config is not None:
            return int(self.config["in_chans"])
        return self.preprocessing.in_chans if self.preprocessing is not None else 3

    def replace(self, **changes: Any) -> ModelInfo:
        return dataclasses.replace(self, **changes)

    def to_metadata(self) -> dict[str, str]:
        """String values for safetensors metadata (and ``last.pt``); :meth:`from_metadata` reads them back."""
        return {
            "model_name": self.model_name or "",
            "config": json.dumps(self.config) if self.config is not None else "",
            "class_names": json.dumps(list(self.class_names)) if self.class_names is not None else "",
            "preprocessing": json.dumps(self.preprocessing.as_dict() if self.preprocessing else {}),
            "form": self.form,
            "precision": self.precision,
            "module_type": self.module_type,
            "runtime": json.dumps(self.runtime) if self.runtime else "",
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], **defaults: Any) -> ModelInfo:
        """The record in ``metadata``; ``defaults`` fill keys that older files do not have. Damaged values
        (bad JSON, wrong types, impossible sizes) are refused with one sentence."""
        try:
            config = _json(metadata, "config", dict)
            if config is not None and config.get("layout", "repvgg") == "repvgg":
                config.pop("layout", None)  # records before 0.1.1 named the RepVGG layout
            names = _json(metadata, "class_names", list)
            runtime = _json(metadata, "runtime", dict)
            if runtime is not None and (
                set(runtime) != {"backend", "precision"}
                or not all(isinstance(v, str) for v in runtime.values())
            ):
                raise TypeError("runtime must name a backend and a precision")
            preprocessing = _json(metadata, "preprocessing", dict)
            if names is not None and not all(isinstance(n, str) for n in names):
                raise TypeError("class names must be strings")
            values = {
                "model_name": metadata.get("model_name") or None,
                "config": config,
                "class_names": tuple(names) if names is not None else None,
                "preprocessing": Preprocessing.from_dict(preprocessing) if preprocessing else None,
                "runtime": runtime,
                **{k: metadata[k] for k in ("form", "precision", "module_type") if metadata.get(k)},
            }
            return cls(**{**defaults, **values})
        except (ValueError, TypeError, KeyError, DataError) as error:
            raise CheckpointError(
                f"The checkpoint's model record is damaged ({error}); save the model again."
            ) from error


def _json(metadata: Mapping[str, str], key: str, kind: type) -> Any:
    text = metadata.get(key)
    if not text:
        return None
    value = json.loads(text)
    if not isinstance(value, kind):
        raise TypeError(f"{key} must be a JSON {kind.__name__}")
    return value or None


class RecordBacked:
    """For models whose labels live in their record ``info`` rather than in attributes (INT8 networks,
    ONNX files): the channels, classes, class names and preprocessing read off it."""

    info: ModelInfo

    @property
    def in_chans(self) -> int:
        return self.info.in_chans

    @property
    def num_classes(self) -> int:
        return int(self.info.num_classes or 0)

    @property
    def class_names(self) -> list[str] | None:
        return list(self.info.class_names) if self.info.class_names is not None else None

    @property
    def preprocessing(self) -> Preprocessing | None:
        return self.info.preprocessing


def model_info(model: nn.Module) -> ModelInfo:
    """The record of any network: a RepVGG's own (architecture, form, class names, preprocessing), an INT8 or
    optimized model's, or, for another network, its form and type alone."""
    info = getattr(model, "info", None)
    if isinstance(info, ModelInfo):
        return info
    return ModelInfo(config=None, form=form_of(model), module_type=type(model).__name__)
