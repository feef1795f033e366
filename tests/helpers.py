"""Helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch

import repvgg
from repvgg.core.info import PREPROCESSING_PRESETS
from repvgg.core.reparam import relative_error

__all__ = ["SMALL", "STRIDES", "relative_error", "small_model", "trained_looking", "with_nan_in"]


def trained_looking(name: str, **kwargs: object) -> repvgg.RepVGG:
    """A model in eval mode with random BatchNorm statistics (fresh ones hide fusion errors)."""
    model = repvgg.create_model(name, **kwargs)  # type: ignore[arg-type]
    repvgg.randomize_batchnorm_(model, seed=1)
    return model.eval()


SMALL = dict(num_blocks=[1, 1, 2, 1], width_multiplier=[0.25, 0.25, 0.25, 0.5])
STRIDES = (1, 2, 2, 2, 2)


def small_model(seed: int = 1, **kwargs: object) -> repvgg.RepVGG:
    """A small Fashion-MNIST-shaped RepVGG that looks trained; the same weights for the same seed."""
    options = {"num_classes": 10, "in_chans": 1, "strides": STRIDES, **SMALL, **kwargs}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = repvgg.RepVGG(**options)  # type: ignore[arg-type]
    repvgg.randomize_batchnorm_(model, seed=seed)
    model.class_names = [f"class {i}" for i in range(model.num_classes)]
    model.preprocessing = PREPROCESSING_PRESETS["fashion-mnist"]
    return model.eval()


def with_nan_in(path: Path, key: str) -> Path:
    """A checkpoint file of this package rewritten with a NaN in tensor ``key`` (a diverged run's file, which
    save_checkpoint itself refuses to write); its record kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    return path
