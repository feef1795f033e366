"""Helpers shared by the tests."""

from __future__ import annotations

import torch

import repvgg


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
