"""The Python API checks its arguments as the command line checks its flags: each mistake is one sentence
naming the parameter, raised as one of the package's errors (a ``TypeError`` for a wrong type, a
``ValueError`` or the area's error for a wrong value), before any work; never a torch internals message and
never a value silently taken."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import repvgg
from repvgg.exceptions import ArgumentTypeError, ArgumentValueError, CheckpointError, ModelConfigError
from tests.helpers import small_model


def _nan_model() -> repvgg.RepVGG:
    model = small_model()
    with torch.no_grad():
        model.stage0.rbr_dense.conv.weight[0, 0, 0, 0] = float("nan")
    return model


_IMAGES = torch.randn(4, 1, 28, 28)


def _optimize(example: Any = _IMAGES, labels: Any = None) -> object:
    eval_data = None if labels is None else [(_IMAGES, labels)]
    precision = "fp32" if labels is None else "auto"
    return repvgg.optimize(
        small_model(),
        backend="eager",
        precision=precision,
        example_input=example,
        eval_data=eval_data,
        calibration=[_IMAGES],
        repeats=1,
    )


CASES: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "create_model-num_classes-negative": (
        lambda _: repvgg.create_model("repvgg_a0", num_classes=-1),
        ModelConfigError,
        "`num_classes` must be at least 0, got -1",
    ),
    "create_model-num_classes-float": (
        lambda _: repvgg.create_model("repvgg_a0", num_classes=2.5),
        ArgumentTypeError,
        "`num_classes` must be a whole number, got 2.5",
    ),
    "create_model-num_classes-string": (
        lambda _: repvgg.create_model("repvgg_a0", num_classes="10"),
        ArgumentTypeError,
        "`num_classes` must be a whole number, got '10'",
    ),
    "create_model-num_classes-bool": (
        lambda _: repvgg.create_model("repvgg_a0", num_classes=True),
        ArgumentTypeError,
        "`num_classes` must be a whole number, got True",
    ),
    "create_model-in_chans-zero": (
        lambda _: repvgg.create_model("repvgg_a0", in_chans=0),
        ModelConfigError,
        "`in_chans` must be at least 1, got 0",
    ),
    "create_model-in_chans-negative": (
        lambda _: repvgg.create_model("repvgg_a0", in_chans=-3),
        ModelConfigError,
        "`in_chans` must be at least 1, got -3",
    ),
    "create_model-deploy-string": (
        lambda _: repvgg.create_model("repvgg_a0", deploy="yes"),
        ArgumentTypeError,
        "`deploy` must be True or False, got 'yes'",
    ),
    "create_model-features_only-int": (
        lambda _: repvgg.create_model("repvgg_a0", features_only=1),
        ArgumentTypeError,
        "`features_only` must be True or False",
    ),
    "RepVGG-use_se-string": (
        lambda _: repvgg.RepVGG([1, 1, 1, 1], 10, [0.25, 0.25, 0.25, 0.5], use_se="no"),
        ArgumentTypeError,
        "`use_se` must be True or False",
    ),
    "list_models-number": (
        lambda _: repvgg.list_models(123),
        ArgumentTypeError,
        "`pattern` must be a string",
    ),
    "load_checkpoint-model-string": (
        lambda tmp: repvgg.load_checkpoint(
            repvgg.save_checkpoint(small_model(), tmp / "m.safetensors"), "str"
        ),
        ArgumentTypeError,
        "`model` must be a PyTorch module (nn.Module), got str",
    ),
    "load_checkpoint-source-number": (
        lambda _: repvgg.load_checkpoint(123),
        ArgumentTypeError,
        "`source` must be a path or a state dict, got int",
    ),
    "save_checkpoint-None": (
        lambda tmp: repvgg.save_checkpoint(None, tmp / "m.safetensors"),
        ArgumentTypeError,
        "`model` must be a PyTorch module (nn.Module), got NoneType",
    ),
    "save_checkpoint-Linear": (
        lambda tmp: repvgg.save_checkpoint(nn.Linear(2, 2), tmp / "m.safetensors"),
        CheckpointError,
        "got a Linear without any; save it with torch.save(model.state_dict(), path)",
    ),
    "save_checkpoint-nan-weights": (
        lambda tmp: repvgg.save_checkpoint(_nan_model(), tmp / "m.safetensors"),
        CheckpointError,
        "holds weights that are not finite (stage0.rbr_dense.conv.weight)",
    ),
    "save_checkpoint-class_names-string": (
        lambda tmp: repvgg.save_checkpoint(small_model(), tmp / "m.safetensors", class_names="abc"),
        ArgumentTypeError,
        "`class_names` must be a list of strings, one per class, got 'abc'",
    ),
    "save_checkpoint-class_names-numbers": (
        lambda tmp: repvgg.save_checkpoint(small_model(), tmp / "m.safetensors", class_names=list(range(10))),
        ArgumentTypeError,
        "`class_names` must be a list of strings",
    ),
    "save_checkpoint-class_names-too-few": (
        lambda tmp: repvgg.save_checkpoint(small_model(), tmp / "m.safetensors", class_names=["a", "b"]),
        CheckpointError,
        "You gave 2 class names for a model with 10 classes",
    ),
    "save_checkpoint-onnx-path": (
        lambda tmp: repvgg.save_checkpoint(small_model(), tmp / "m.onnx"),
        CheckpointError,
        "names an ONNX file, but save_checkpoint writes safetensors",
    ),
    "reparameterize-None": (
        lambda _: repvgg.reparameterize(None),
        ArgumentTypeError,
        "`module` must be a PyTorch module (nn.Module), got NoneType",
    ),
    "verify_equivalence-None": (
        lambda _: repvgg.verify_equivalence(None),
        ArgumentTypeError,
        "`reference` must be a PyTorch module (nn.Module), got NoneType",
    ),
    "verify_equivalence-converted-string": (
        lambda _: repvgg.verify_equivalence(small_model(), converted="deployed"),
        ArgumentTypeError,
        "`converted` must be a PyTorch module",
    ),
    "optimize-example-wrong-channels": (
        lambda _: _optimize(torch.randn(2, 3, 28, 28)),
        ArgumentValueError,
        "`example_input` has 3 channels but the model takes 1-channel images",
    ),
    "optimize-example-list": (
        lambda _: _optimize([1, 2]),
        ArgumentTypeError,
        "`example_input` must be a tensor, a batch of images (N, C, H, W), got list",
    ),
    "optimize-example-integers": (
        lambda _: _optimize(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)),
        ArgumentValueError,
        "`example_input` must be a floating-point batch of images (N, C, H, W), got shape (2, 1, 28, 28)",
    ),
    "optimize-labels-out-of-range": (
        lambda _: _optimize(labels=torch.tensor([0, 1, 17, 2])),
        ArgumentValueError,
        "`eval_data` holds the label 17 but the model has 10 classes (0 to 9)",
    ),
    "optimize-labels-negative": (
        lambda _: _optimize(labels=torch.tensor([0, -1, 1, 2])),
        ArgumentValueError,
        "`eval_data` holds the label -1",
    ),
    "optimize-labels-float": (
        lambda _: _optimize(labels=torch.tensor([0.0, 1.0, 2.0, 2.0])),
        ArgumentValueError,
        "`eval_data` labels must be class indices (an integer tensor), got float32",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_wrong_argument_is_one_sentence_naming_it(case: str, tmp_path: Path) -> None:
    call, error_type, words = CASES[case]
    with pytest.raises(error_type) as raised:
        call(tmp_path)
    message = str(raised.value)
    assert isinstance(raised.value, repvgg.RepVGGError) and isinstance(raised.value, TypeError | ValueError)
    assert words in message and "\n" not in message, message
    assert not list(tmp_path.iterdir()) or case.startswith("load_checkpoint"), "nothing written"
