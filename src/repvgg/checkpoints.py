"""Reading and writing checkpoints: this package's safetensors format and the formats users hold.

Our format is a safetensors file: the weights, plus metadata that rebuilds the model with nothing
else (architecture, number of classes, train or deploy form, class names). Files in other formats are
read with ``torch.load(..., weights_only=True)``: checkpoints are data, never code to unpickle.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from repvgg.exceptions import CheckpointError, RepVGGError, RepVGGWarning
from repvgg.formats import (
    CONVENTIONS,
    convert_state_dict,
    detect_format,
    infer_architecture,
    unwrap_state_dict,
)
from repvgg.models import RepVGG, name_for_config
from repvgg.reparam import is_deployed, reparameterizable_blocks

FORMAT_TAG = "repvgg"
FORMAT_VERSION = "1"
PathLike = str | os.PathLike[str]
KNOWN_FORMATS = (
    "this package's .safetensors files, and PyTorch state dicts (.pth/.pt/.safetensors) in the authors', "
    "timm's or mmpretrain's key names"
)


@dataclass
class Checkpoint:
    """A checkpoint read into memory, its keys in this package's (the authors') names.

    ``source_format`` is ``repvgg`` for our own files, else the convention detected: ``official``,
    ``timm`` or ``mmpretrain``. ``config`` is None when the weights belong to a network that is not a
    bare RepVGG (a segmenter saved with :func:`save_checkpoint`).
    """

    state_dict: dict[str, Tensor]
    source_format: str
    form: str
    config: dict[str, Any] | None
    model_name: str | None
    class_names: list[str] | None
    preprocessing: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.config is None else int(self.config["num_classes"])


def _form_of(model: nn.Module) -> str:
    blocks = reparameterizable_blocks(model)
    if not blocks:
        return "none"
    if is_deployed(model):
        return "deploy"
    if any(block.deploy for block in blocks):
        raise CheckpointError(
            "Some RepVGG blocks of this model are converted and others are not; convert all of them "
            "with repvgg.reparameterize(model) before saving."
        )
    return "train"


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    *,
    what: str = "the checkpoint",
    error_type: type[RepVGGError] = CheckpointError,
) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place.

    An interrupted or failed write never leaves a damaged file where a good one was; a failure is
    reported as one sentence naming ``what`` was being written.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if temporary.is_file():
            temporary.unlink()
        raise error_type(
            f"Cannot write {what} to {path} ({error.strerror or error}); choose a writable "
            "location with enough free space."
        ) from error


def save_checkpoint(model: nn.Module, path: PathLike, *, class_names: Sequence[str] | None = None) -> Path:
    """Write ``model`` in this package's format: safetensors weights plus rebuild metadata.

    The file is written next to ``path`` and renamed into place, so an interrupted save never leaves
    a damaged file where a good one was. ``class_names`` defaults to ``model.class_names``.
    """
    path = Path(path)
    names = list(class_names) if class_names is not None else getattr(model, "class_names", None)
    metadata = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "form": _form_of(model),
        "module_type": type(model).__name__,
        "class_names": json.dumps(names) if names is not None else "",
        "preprocessing": json.dumps(getattr(model, "preprocessing", None) or {}),
    }
    if isinstance(model, RepVGG):
        if names is not None and model.num_classes and len(names) != model.num_classes:
            raise CheckpointError(
                f"{len(names)} class names were given for a model with {model.num_classes} classes; "
                "give one name per class."
            )
        metadata["config"] = json.dumps(model.config)
        metadata["model_name"] = model.model_name or name_for_config(model.config) or ""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda target: save_file(tensors, str(target), metadata=metadata))
    return path


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 0 < header_length < path.stat().st_size and head[8:9] == b"{"


def _read_file(path: Path) -> tuple[Any, dict[str, str]]:
    """The raw object stored in ``path`` and its safetensors metadata (empty for other files)."""
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {path}: check the path.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the path of a checkpoint file in it.")
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                return {k: handle.get_tensor(k) for k in handle.keys()}, metadata  # noqa: SIM118
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{path} is a damaged or truncated safetensors file ({error}); save it again."
            ) from error
    if not _is_torch_file(path):
        raise CheckpointError(f"{path} is not a checkpoint in any format repvgg knows ({KNOWN_FORMATS}).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            raise CheckpointError(
                f"{path} stores Python objects besides tensors, which are not unpickled for safety; "
                "re-save it as a plain state dict with torch.save(model.state_dict(), path)."
            ) from error
        raise CheckpointError(f"{path} is a damaged or truncated PyTorch file; save it again.") from error
    except Exception as error:  # a damaged file fails in many ways inside torch.load
        raise CheckpointError(f"{path} is a damaged or truncated PyTorch file; save it again.") from error


def _is_torch_file(path: Path) -> bool:
    """A ``torch.save`` file: a zip archive (PyTorch >= 1.6) or a bare pickle (older PyTorch)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


INT8_FORMAT_TAG = "repvgg-int8"


def read_checkpoint(source: PathLike | Mapping[str, Any]) -> Checkpoint:
    """Read a float checkpoint from a path or an in-memory state dict, in any known format."""
    raw, metadata = _read_source(source)
    return _checkpoint_from(raw, metadata)


def _read_source(source: PathLike | Mapping[str, Any]) -> tuple[Any, dict[str, str]]:
    return (source, {}) if isinstance(source, Mapping) else _read_file(Path(source))


def _checkpoint_from(raw: Any, metadata: dict[str, str]) -> Checkpoint:
    if metadata.get("format") == INT8_FORMAT_TAG:
        raise CheckpointError(
            "This is an INT8 (quantized) checkpoint: it can be evaluated, predicted and benchmarked, but "
            "converting, exporting or training needs the float checkpoint it was quantized from."
        )
    if metadata.get("format") == FORMAT_TAG:
        return _own_checkpoint(raw, metadata)
    state = unwrap_state_dict(raw)
    source_format = detect_format(state)
    state = convert_state_dict(state, to="native")
    inferred = infer_architecture(state)
    return Checkpoint(
        state_dict=state,
        source_format=source_format,
        form=inferred.form,
        config=inferred.config,
        model_name=name_for_config(inferred.config),
        class_names=None,
    )


def _own_checkpoint(state: dict[str, Tensor], metadata: Mapping[str, str]) -> Checkpoint:
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"The checkpoint is in version {metadata.get('format_version')} of this package's format, "
            f"which this version (format {FORMAT_VERSION}) cannot read; upgrade repvgg."
        )
    config = json.loads(metadata["config"]) if metadata.get("config") else None
    return Checkpoint(
        state_dict=dict(state),
        source_format=FORMAT_TAG,
        form=metadata.get("form", "train"),
        config=config,
        model_name=metadata.get("model_name") or None,
        class_names=json.loads(metadata["class_names"]) if metadata.get("class_names") else None,
        preprocessing=json.loads(metadata.get("preprocessing") or "{}") or None,
    )


def build_model(checkpoint: Checkpoint) -> RepVGG:
    """An untrained RepVGG of the checkpoint's architecture and form."""
    if checkpoint.config is None:
        raise CheckpointError(
            "This checkpoint holds a network that is not a bare RepVGG, so it cannot rebuild itself; "
            "build that network and pass it as model=."
        )
    model = RepVGG(**checkpoint.config, deploy=checkpoint.form == "deploy")
    model.model_name = checkpoint.model_name or name_for_config(checkpoint.config)
    return model


def load_checkpoint(source: PathLike | Mapping[str, Any], model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint in any known format; with ``model``, strictly into it, else into a new model.

    ``source`` is a path or a state dict: this package's safetensors files (an INT8 one loads as a
    :class:`repvgg.quantization.QuantizedRepVGG`), the authors' train- or
    deploy-time state dicts, timm's and mmpretrain's, with or without a ``module.`` prefix or a
    ``state_dict`` / ``model`` wrapper. A mismatch raises :class:`CheckpointError` naming the likely
    cause and the first offending keys; nothing is loaded partially.
    """
    raw, metadata = _read_source(source)
    if metadata.get("format") == INT8_FORMAT_TAG and model is None:
        from repvgg.quantization import load_quantized

        return load_quantized(raw, metadata)
    checkpoint = _checkpoint_from(raw, metadata)
    if model is None:
        model = build_model(checkpoint)
    load_state_dict_strict(model, checkpoint)
    if isinstance(model, RepVGG):
        if checkpoint.class_names is not None:
            model.class_names = list(checkpoint.class_names)
        if checkpoint.preprocessing is not None:
            model.preprocessing = dict(checkpoint.preprocessing)
    return model


def load_state_dict_strict(model: nn.Module, checkpoint: Checkpoint) -> None:
    """``model.load_state_dict(strict=True)``, with a one-sentence diagnosis instead of a key dump."""
    given = checkpoint.state_dict
    expected = model.state_dict()
    head = CONVENTIONS["official"].head + "."
    dropped = sorted(k for k in given if k.startswith(head) and k not in expected)
    if dropped and isinstance(model, RepVGG) and model.num_classes == 0:
        given = {k: v for k, v in given.items() if k not in dropped}
        warnings.warn(
            f"The checkpoint's classifier head ({', '.join(dropped)}) was dropped: the model has no head "
            "(a backbone, or num_classes=0).",
            RepVGGWarning,
            stacklevel=3,
        )
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected if k in given and expected[k].shape != given[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(_diagnose(model, checkpoint, missing, unexpected, mismatched))
    model.load_state_dict(given, strict=True)


def _role_in(keys: list[str], role: str) -> bool:
    prefix = "." + CONVENTIONS["official"].roles[role] + "."
    return any(prefix in "." + key for key in keys)


def _describe(name: str | None, config: Mapping[str, Any] | None) -> str:
    if name:
        return name
    if config:
        return f"a RepVGG with blocks {config['num_blocks']} and widths {config['width_multiplier']}"
    return "another network"


def _diagnose(
    model: nn.Module,
    checkpoint: Checkpoint,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    if _role_in(unexpected, "reparam") and _role_in(missing, "dense.conv"):
        return (
            "This is a deploy-form (already converted) checkpoint but the model is in training form: "
            "build the model with deploy=True, e.g. repvgg.create_model(name, deploy=True)."
        )
    if _role_in(unexpected, "dense.conv") and _role_in(missing, "reparam"):
        return (
            "This is a training-form checkpoint but the model is in deploy form: build the model with "
            "deploy=False, load it, then convert it with repvgg.reparameterize(model)."
        )
    checkpoint_block = (checkpoint.config or {}).get("block", "repvgg")
    model_block = getattr(model, "block", checkpoint_block)
    if checkpoint.form == "train" and checkpoint_block != model_block:
        return (
            f"The checkpoint was trained with {checkpoint_block!r} blocks but the model has "
            f"{model_block!r} blocks: build the model with block={checkpoint_block!r}."
        )
    head = CONVENTIONS["official"].head + "."
    wrong = missing + unexpected + mismatched
    if wrong and all(key.startswith(head) for key in wrong) and isinstance(model, RepVGG):
        return (
            f"The checkpoint's classifier has {checkpoint.num_classes} classes but the model's has "
            f"{model.num_classes}: build the model with num_classes={checkpoint.num_classes}."
        )
    model_desc = "the model"
    if isinstance(model, RepVGG):
        model_desc = (
            f"the model is {_describe(model.model_name or name_for_config(model.config), model.config)}"
        )
    details = []
    if missing:
        details.append("missing " + ", ".join(missing[:3]))
    if unexpected:
        details.append("unexpected " + ", ".join(unexpected[:3]))
    if mismatched:
        expected = model.state_dict()
        details.append(
            "wrong shape "
            + ", ".join(
                f"{k} (checkpoint {list(checkpoint.state_dict[k].shape)}, model {list(expected[k].shape)})"
                for k in mismatched[:3]
            )
        )
    return (
        f"The checkpoint does not fit this model (the checkpoint is "
        f"{_describe(checkpoint.model_name, checkpoint.config)}, {model_desc}); "
        f"first offending keys: {'; '.join(details)}."
    )
