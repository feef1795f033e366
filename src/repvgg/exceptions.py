"""Errors and warnings meant to be read by people.

Every error the package raises on purpose is a :class:`RepVGGError` whose message is one sentence saying
what is wrong and what to do. The command-line interface prints that sentence instead of a traceback.
"""

from __future__ import annotations


class RepVGGError(Exception):
    """Base class of the errors this package raises on purpose."""


class CheckpointError(RepVGGError, ValueError):
    """A checkpoint cannot be read, recognised, or loaded into the given model."""


class ConversionError(RepVGGError, ValueError):
    """A module cannot be re-parameterized, or its conversion did not reproduce its outputs."""


class ModelConfigError(RepVGGError, ValueError):
    """A model name or constructor option is not valid."""


class RepVGGWarning(UserWarning):
    """A warning about a likely mistake that the package can still carry out."""


class DataError(RepVGGError, ValueError):
    """A dataset is missing, unreadable, or does not fit the model."""


class TrainingError(RepVGGError, RuntimeError):
    """Training cannot go on (a non-finite loss, a run that cannot be resumed)."""


class ExportError(RepVGGError, ValueError):
    """A model cannot be exported, written, or its export does not reproduce its outputs."""


class InferenceError(RepVGGError, RuntimeError):
    """A backend cannot run a model here, or prediction was asked for something impossible."""


class QuantizationError(RepVGGError, ValueError):
    """INT8 quantization cannot go ahead: no calibration images, an unsupported model, and so on."""


class ArgumentTypeError(RepVGGError, TypeError):
    """A function of the package was given an argument of the wrong type (a string for a number, None for a
    model); raised before any work, naming the parameter."""


class ArgumentValueError(RepVGGError, ValueError):
    """A function of the package was given an argument of the right type but a value it cannot take (an
    example batch with the wrong channels, labels outside the model's classes); raised before any work."""
