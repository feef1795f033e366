"""Helpers shared by the tests."""

from __future__ import annotations

import torch

import repvgg
from repvgg.data import PREPROCESSING_PRESETS


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max |expected|: the project's measure of agreement."""
    actual, expected = actual.detach(), expected.detach()
    error, scale = float((actual - expected).abs().max()), float(expected.abs().max())
    return error / scale if scale > 0 else error


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
    model.preprocessing = PREPROCESSING_PRESETS["fashion-mnist"].as_dict()
    return model.eval()
