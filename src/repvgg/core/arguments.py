"""Checks of the Python API's arguments, as the command line checks its flags: a wrong type or value is one
sentence naming the parameter (:class:`~repvgg.exceptions.ArgumentTypeError` for a type, the calling area's
error for a value), never a torch internals message and never a silently accepted value."""

from typing import Any

from torch import nn

from repvgg.exceptions import ArgumentTypeError, ModelConfigError, RepVGGError


def whole_number(
    value: Any, name: str, low: int, high: int | None = None, error: type[RepVGGError] = ModelConfigError
) -> int:
    """``value`` if it is an int (not a bool, a float or a string) from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"`{name}` must be a whole number, got {value!r} ({type(value).__name__}).")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" + (f" and at most {high}" if high is not None else "")
        raise error(f"`{name}` must be {bounds}, got {value}.")
    return value


def switch(value: Any, name: str) -> bool:
    """``value`` if it is True or False (``"yes"`` or 1 would be taken for True without a word)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def module(value: Any, name: str) -> nn.Module:
    """``value`` if it is a PyTorch module."""
    if not isinstance(value, nn.Module):
        raise ArgumentTypeError(f"`{name}` must be a PyTorch module (nn.Module), got {type(value).__name__}.")
    return value


def text(value: Any, name: str) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"`{name}` must be a string, got {value!r} ({type(value).__name__}).")
    return value


def probability(value: Any, name: str, error: type[RepVGGError] = ModelConfigError) -> float:
    """``value`` as a float if it is a real number from 0 to below 1 (a rate of dropping: 1 keeps nothing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentTypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise error(f"`{name}` must be at least 0 and below 1, got {value}.")
    return float(value)
