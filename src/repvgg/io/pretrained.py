"""Starting a model from pretrained weights: this package's files, or the authors', timm's and
mmpretrain's ImageNet checkpoints. Nothing is downloaded: a path is given.

Fine-tuning on another dataset usually needs two adaptations, both said in the one line
:func:`load_pretrained` returns: a new classifier head for another number of classes, and a stem for
another number of input channels (grey or multi-channel images; timm's ``adapt_input_conv``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repvgg.core.info import model_info
from repvgg.core.models import RepVGG
from repvgg.core.registry import create_model as build_named_model
from repvgg.exceptions import CheckpointError, RepVGGWarning
from repvgg.io.checkpoints import FORMAT_NAMES, load_checkpoint, read_checkpoint, require_kind
from repvgg.io.files import PathLike


def load_pretrained(
    source: PathLike | Mapping[str, Any], model: RepVGG, *, replace_head: bool = False
) -> str:
    """Load a checkpoint into ``model`` to train (or use) it from there; returns what was done, in one line.

    The checkpoint must be in ``model``'s form (a converted model cannot be trained as a multi-branch one).
    Its stem is adapted to ``model``'s input channels. A checkpoint with another number of classes is
    refused unless ``replace_head``: then ``model`` keeps its own, newly initialised head.
    """
    require_kind(source, ("classifier",), "a classifier's training", CheckpointError)
    checkpoint = read_checkpoint(source)
    where = str(source) if not isinstance(source, Mapping) else "the state dict"
    form = model_info(model).form
    if checkpoint.form != form:
        raise CheckpointError(
            f"{where} holds a {checkpoint.form}-form model but the model is in {form} form; a converted "
            "model cannot be trained as a multi-branch one, so start from the training-form (*_train) file."
        )
    done = []
    state = checkpoint.state_dict
    loaded = len(state)
    if checkpoint.num_classes != model.num_classes:
        if not replace_head:
            raise CheckpointError(
                f"{where} has {checkpoint.num_classes} classes but the model {model.num_classes}: replace "
                "its classifier head (`finetune`) to fine-tune it on these classes."
            )
        state = {k: v for k, v in state.items() if not k.startswith("linear.")}
        loaded = len(state)
        state.update({f"linear.{k}": v for k, v in model.linear.state_dict().items()})
        old, new = checkpoint.num_classes, model.num_classes
        done.append(f"replaced its {old}-class head by a new {new}-class one")
    if checkpoint.info.in_chans != model.in_chans:
        done.append(f"adapted its stem from {checkpoint.info.in_chans} to {model.in_chans} input channels")
    with warnings.catch_warnings():  # the stem adaptation is said in the line returned
        warnings.simplefilter("ignore", RepVGGWarning)
        load_checkpoint(state, model=model, adapt_in_chans=True)
    name = checkpoint.model_name or "a RepVGG"
    kind = FORMAT_NAMES.get(checkpoint.source_format, "this package's")
    return "; ".join([f"loaded {loaded} tensors of {name} ({kind} format) from {where}", *done])


def create_model(
    name: str,
    num_classes: int = 1000,
    deploy: bool = False,
    in_chans: int = 3,
    features_only: bool = False,
    *,
    pretrained: PathLike | bool | None = None,
    **options: Any,
) -> RepVGG:
    """A named model (see :func:`repvgg.core.registry.create_model`, whose arguments these are), started
    from the checkpoint file ``pretrained`` when one is given (timm's argument; nothing is downloaded).

    As in timm, a ``num_classes`` other than the checkpoint's gets a new head, and ``in_chans`` other than
    the checkpoint's an adapted stem; :func:`load_pretrained` says which in a :class:`RepVGGWarning`.
    """
    if pretrained is True:
        raise CheckpointError(
            "This package downloads no weights: give `pretrained` the path of a checkpoint file, e.g. the "
            "authors' RepVGG-A0-train.pth, timm's or mmpretrain's file, or one this package wrote."
        )
    model = build_named_model(
        name,
        num_classes=num_classes,
        deploy=deploy,
        in_chans=in_chans,
        features_only=features_only,
        **options,
    )
    if pretrained is None or pretrained is False:
        return model
    if not Path(pretrained).is_file():
        raise CheckpointError(f"No checkpoint file at {pretrained}: check the `pretrained` path.")
    done = load_pretrained(pretrained, model, replace_head=True)
    if ";" in done:
        warnings.warn(done, RepVGGWarning, stacklevel=2)
    return model
