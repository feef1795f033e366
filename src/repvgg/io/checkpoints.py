"""Reading and writing checkpoints: this package's safetensors formats (float and INT8), the training state
``last.pt``, and the formats users hold.

Every file this package writes carries the model-info record (:class:`repvgg.core.info.ModelInfo`), which
rebuilds the model with nothing else. Files in other formats are read with ``torch.load(...,
weights_only=True)``: checkpoints are data, never code to unpickle.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from repvgg.core import arguments
from repvgg.core.info import ModelInfo, model_info
from repvgg.core.int8 import QuantizedRepVGG, convert_int8, example_input, prepare_int8, x86_engine
from repvgg.core.models import RepVGG, adapt_input_conv, stage_widths
from repvgg.core.registry import name_for_config
from repvgg.core.reparam import refuse_nonfinite, reparameterizable_blocks
from repvgg.core.segmentation import PSPNet
from repvgg.exceptions import (
    ArgumentTypeError,
    CheckpointError,
    ConversionError,
    QuantizationError,
    RepVGGError,
    RepVGGWarning,
)
from repvgg.io.files import PathLike, atomic_write
from repvgg.io.formats import (
    CONVENTIONS,
    convert_state_dict,
    detect_format,
    infer_architecture,
    unwrap_state_dict,
)
from repvgg.io.machine import cpu_features
from repvgg.io.onnxfile import load_onnx

FORMAT_TAG = "repvgg"
INT8_FORMAT_TAG = "repvgg-int8"
STATE_FORMAT_TAG = "repvgg-training-state"
FORMAT_VERSION = "1"
KNOWN_FORMATS = (
    "this package's .safetensors files, and PyTorch state dicts (.pth/.pt/.safetensors) in the authors', "
    "timm's or mmpretrain's key names"
)


@dataclass
class Checkpoint:
    """A float checkpoint read into memory, its keys in this package's (the authors') names.

    ``source_format`` is ``repvgg`` for our own files (and training states), else the convention detected:
    ``official``, ``timm`` or ``mmpretrain``. ``info`` is the file's model record; for other formats it is
    inferred from the tensor shapes (the paper's strides assumed, no class names or preprocessing).
    """

    state_dict: dict[str, Tensor]
    source_format: str
    info: ModelInfo

    @property
    def form(self) -> str:
        return self.info.form

    @property
    def config(self) -> dict[str, Any] | None:
        return self.info.config

    @property
    def model_name(self) -> str | None:
        return self.info.model_name

    @property
    def class_names(self) -> list[str] | None:
        return list(self.info.class_names) if self.info.class_names is not None else None

    @property
    def num_classes(self) -> int | None:
        return self.info.num_classes


def _record_of(model: nn.Module, class_names: Sequence[str] | None) -> ModelInfo:
    """The record to save with ``model``; a model with some blocks converted and some not is refused."""
    try:
        info = model_info(model)
    except ConversionError as error:
        raise CheckpointError(f"{error} Then save it.") from error
    if info.config is not None and not info.model_name:
        info = info.replace(model_name=name_for_config(info.config))
    if class_names is None:
        return info
    if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
        raise ArgumentTypeError(
            f"`class_names` must be a list of strings, one per class, got {class_names!r}."
        )
    try:
        return info.replace(class_names=tuple(class_names))
    except CheckpointError as error:
        raise CheckpointError(str(error).replace("The model record has", "You gave")) from error


def save_checkpoint(model: nn.Module, path: PathLike, *, class_names: Sequence[str] | None = None) -> Path:
    """Write ``model`` in this package's format: safetensors weights plus its model-info record.

    The file is written next to ``path`` and renamed into place, so an interrupted save never leaves
    a damaged file where a good one was. ``class_names`` defaults to the model's own.
    """
    if isinstance(model, QuantizedRepVGG):
        return save_quantized(model, path)
    arguments.module(model, "model")
    if Path(path).suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{path} names an ONNX file, but save_checkpoint writes safetensors: give a .safetensors path, "
            "or export ONNX with repvgg.export_model."
        )
    info = _record_of(model, class_names)
    says_what_it_is = isinstance(getattr(model, "info", None), ModelInfo)  # e.g. the ablation's baseline
    if info.config is None and not says_what_it_is and not reparameterizable_blocks(model):
        raise CheckpointError(
            f"save_checkpoint writes networks of RepVGG blocks (read back with `model` when the file cannot "
            f"rebuild them), got a {type(model).__name__} without any; save it with "
            "torch.save(model.state_dict(), path)."
        )
    refuse_nonfinite(model, "The model", CheckpointError)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.bfloat16}:
        info = info.replace(precision="bfloat16")  # the record says how the weights are stored
    metadata = {"format": FORMAT_TAG, "format_version": FORMAT_VERSION, **info.to_metadata()}
    path = Path(path)
    atomic_write(path, lambda target: save_file(tensors, str(target), metadata=metadata))
    return path


def save_training_state(path: PathLike, state: dict[str, Any], model: nn.Module) -> None:
    """Write a training state (``last.pt``: weights under ``model``, optimizer, schedule, RNG, ...) with the
    model's record, so that the file converts, evaluates and predicts like a checkpoint. Atomic."""
    record = {"format": STATE_FORMAT_TAG, "format_version": FORMAT_VERSION}
    payload = {**state, "info": {**record, **_record_of(model, None).to_metadata()}}
    atomic_write(Path(path), lambda target: torch.save(payload, target), what="the training state")


def load_training_state(path: PathLike) -> dict[str, Any]:
    """A training state written by :func:`save_training_state` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No training state at {path}: check the path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError
    ) as error:  # objects besides tensors: never unpickled (torch's advice is not)
        raise CheckpointError(
            f"{path} stores Python objects besides tensors, which are not unpickled for safety; it is not a "
            "training state of this package."
        ) from error
    except Exception as error:  # a damaged file fails in many ways inside torch.load
        raise CheckpointError(
            f"{path} cannot be read ({_first_line(error)}); it is damaged, start the run again."
        ) from error
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a training state of this package; start the run again.")
    return state


def _first_line(error: BaseException) -> str:
    """A library error's first line, or its type when it says nothing."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 0 < header_length < 100_000_000 and head[8:9] == b"{"  # a cut file still says so: read it


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
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            raise CheckpointError(
                f"{path} stores Python objects besides tensors, which are not unpickled for safety; "
                "re-save it as a plain state dict with torch.save(model.state_dict(), path)."
            ) from error
        raise CheckpointError(f"{path} is a damaged or truncated PyTorch file; save it again.") from error
    except Exception as error:  # a damaged file fails in many ways inside torch.load
        raise CheckpointError(f"{path} is a damaged or truncated PyTorch file; save it again.") from error
    record = raw.get("info") if isinstance(raw, dict) else None
    if isinstance(record, dict) and record.get("format") == STATE_FORMAT_TAG:
        return raw["model"], {str(k): str(v) for k, v in record.items()}  # a training state (last.pt)
    return raw, {}


def _is_torch_file(path: Path) -> bool:
    """A ``torch.save`` file: a zip archive (PyTorch >= 1.6) or a bare pickle (older PyTorch)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_checkpoint(source: PathLike | Mapping[str, Any]) -> Checkpoint:
    """Read a float checkpoint from a path or an in-memory state dict, in any known format."""
    raw, metadata = _read_source(source)
    return _checkpoint_from(raw, metadata)


FORMAT_NAMES = {"official": "the authors'", "timm": "timm's", "mmpretrain": "mmpretrain's"}


def guessed(checkpoint: Checkpoint) -> str | None:
    """What had to be assumed about a checkpoint that carries no model record (other code bases' files, a
    plain state dict): said to the user by every command that builds a model from it."""
    if checkpoint.source_format == FORMAT_TAG:
        return None
    return (
        f"it is in {FORMAT_NAMES.get(checkpoint.source_format, 'another')} format, which records no strides, "
        "class names or preprocessing: the paper's strides (2, 2, 2, 2, 2) are assumed"
    )


def is_segmenter(source: PathLike) -> bool:
    """Whether a file holds a PSPNet (its checkpoint, ``last.pt`` or ONNX export); False for anything else,
    unreadable files included (the command reading it then says what is wrong)."""
    return file_kind(source) in ("segmenter", "onnx-segmenter")


#: What each kind of model file is, in words (see :func:`file_kind`).
KIND_WORDS = {
    "classifier": "a RepVGG classifier checkpoint",
    "segmenter": "a PSPNet (segmentation) checkpoint",
    "int8": "an INT8 (quantized) checkpoint",
    "onnx": "an ONNX model",
    "onnx-segmenter": "a PSPNet's ONNX export",
    "torchscript": "a TorchScript program (as `repvgg export` writes .pt files)",
}
_KIND_SHORT = {
    "classifier": "a classifier's checkpoint",
    "segmenter": "a PSPNet's checkpoint",
    "int8": "an INT8 checkpoint",
    "onnx": "an ONNX classifier",
}
#: Where a kind of file goes instead, said when a command refuses it.
_KIND_ADVICE = {
    "classifier": "give it a PSPNet's checkpoint",
    "segmenter": "its network is a PSPNet: eval, predict, verify, convert, export and bench take it",
    "int8": "it can be evaluated, predicted and benchmarked; the rest needs the float checkpoint it was "
    "quantized from",
    "onnx": "it runs as it is (eval, predict, bench); the rest needs the checkpoint it was exported from",
    "onnx-segmenter": "it runs with onnxruntime as it is; the commands here take the PSPNet's .safetensors "
    "checkpoint it was exported from",
    "torchscript": "run it with torch.jit.load; the commands here take the checkpoint it was exported from",
}


def file_kind(source: PathLike | Mapping[str, Any]) -> str | None:
    """What kind of model file ``source`` is (a key of :data:`KIND_WORDS`), from its header where it can:
    None for what is not a readable file (the reader then says what is wrong with it). A state dict in
    another code base's names, like a run's ``last.pt``, is the kind of the network it holds."""
    if isinstance(source, Mapping):
        return "classifier"
    path = Path(source)
    try:
        if not path.is_file():
            return None
        if path.suffix.lower() == ".onnx":
            return _onnx_kind(path)
        if _is_safetensors(path):
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("format") == INT8_FORMAT_TAG:
                return "int8"
            return "segmenter" if metadata.get("module_type") == "PSPNet" else "classifier"
        if _is_torchscript(path):
            return "torchscript"
        if _is_torch_file(path):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            record = state.get("info") if isinstance(state, dict) else None
            if isinstance(record, dict) and record.get("module_type") == "PSPNet":
                return "segmenter"
            return "classifier"
    except Exception:  # unreadable: the command reading it says what is wrong
        return None
    return None


def _onnx_kind(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    return "onnx-segmenter" if metadata.get("module_type") == "PSPNet" else "onnx"


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip holding compiled code and constants."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def require_kind(
    source: PathLike | Mapping[str, Any],
    accepted: Sequence[str],
    purpose: str,
    error_type: type[RepVGGError] = CheckpointError,
) -> None:
    """Refuse, in one sentence before any work, a model file of a kind ``purpose`` does not take (see
    :func:`file_kind`); a file whose kind cannot be told is left to the reader, which says what is wrong."""
    kind = file_kind(source)
    if kind is None or kind in accepted:
        return
    takes = [_KIND_SHORT[k] for k in accepted]
    listed = ", ".join(takes[:-1]) + f" or {takes[-1]}" if len(takes) > 1 else takes[0]
    raise error_type(f"{source} is {KIND_WORDS[kind]}, but {purpose} takes {listed}; {_KIND_ADVICE[kind]}.")


def source_note(source: PathLike) -> str | None:
    """:func:`guessed` for a checkpoint file; this package's own files answer from their header alone."""
    path = Path(source)
    try:
        if path.is_file() and _is_safetensors(path):
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("format") in (FORMAT_TAG, INT8_FORMAT_TAG):
                    return None
        return guessed(read_checkpoint(path))
    except (RepVGGError, SafetensorError, OSError):
        return None  # the command reading it says what is wrong with it


def _read_source(source: PathLike | Mapping[str, Any]) -> tuple[Any, dict[str, str]]:
    return (source, {}) if isinstance(source, Mapping) else _read_file(Path(source))


def _checkpoint_from(raw: Any, metadata: dict[str, str]) -> Checkpoint:
    tag = metadata.get("format")
    if tag == INT8_FORMAT_TAG:
        raise CheckpointError(
            "This is an INT8 (quantized) checkpoint: it can be evaluated, predicted and benchmarked, but "
            "converting, exporting or training needs the float checkpoint it was quantized from."
        )
    if tag in (FORMAT_TAG, STATE_FORMAT_TAG):
        _check_version(metadata)
        return Checkpoint(dict(raw), FORMAT_TAG, ModelInfo.from_metadata(metadata))
    state = unwrap_state_dict(raw)
    source_format = detect_format(state)
    state = convert_state_dict(state, to="native")
    inferred = infer_architecture(state)
    info = ModelInfo(model_name=name_for_config(inferred.config), config=inferred.config, form=inferred.form)
    return Checkpoint(state_dict=state, source_format=source_format, info=info)


def _check_version(metadata: Mapping[str, str]) -> None:
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"The checkpoint is in version {metadata.get('format_version')} of this package's format, "
            f"which this version (format {FORMAT_VERSION}) cannot read; upgrade repvgg."
        )


def build_model(checkpoint: Checkpoint) -> RepVGG | PSPNet:
    """An untrained network of the checkpoint's architecture and form (a RepVGG, or a PSPNet over one),
    carrying its record's labels."""
    info = checkpoint.info
    if info.config is None:
        raise CheckpointError(
            "This checkpoint holds a network that is neither a RepVGG nor a PSPNet over one, so it cannot "
            "rebuild itself; build that network and pass it as model=."
        )
    if info.config.get("layout", "repvgg") != "repvgg":
        raise CheckpointError(
            f"This checkpoint holds the {info.config['layout']} baseline, not a RepVGG; build it "
            "(repvgg.studies.ablation.ResidualReorg) and pass it as model=."
        )
    _check_record(checkpoint)
    model = _construct(info)
    label_model(model, info)
    return model


def _construct(info: ModelInfo) -> RepVGG | PSPNet:
    """The untrained network a record describes (on the current default device)."""
    assert info.config is not None
    deploy = info.form == "deploy"
    try:
        if info.module_type == "PSPNet":
            return PSPNet.from_config(info.config, deploy=deploy)
        return RepVGG(**info.config, deploy=deploy)
    except (TypeError, KeyError, AttributeError, ValueError) as error:
        raise CheckpointError(
            f"The checkpoint's architecture record is damaged ({error!r}); save it again."
        ) from error


#: Sizes beyond these in a record are damage or an edit: refused before anything is allocated.
RECORD_LIMITS = {"blocks": 1_000, "channels": 16_384, "num_classes": 1_000_000, "in_chans": 1_024}


def _check_record(checkpoint: Checkpoint) -> None:
    """Refuse a record that cannot be this file's: sizes no network has (before any allocation), a model
    name that is not its architecture's, an architecture whose tensors are not the file's (compared on the
    meta device, which allocates nothing)."""
    info = checkpoint.info
    assert info.config is not None
    backbone = info.config.get("backbone", info.config) if info.module_type == "PSPNet" else info.config
    try:
        blocks = sum(int(n) for n in backbone["num_blocks"])
        widest = max(stage_widths(backbone["width_multiplier"], int(backbone.get("base_channels", 64))))
        sizes = {
            "blocks": blocks,
            "channels": max(widest, int(info.config.get("head_channels", 0))),
            "num_classes": int(info.config["num_classes"]),
            "in_chans": int(info.config["in_chans"]),
        }
    except (TypeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"The checkpoint's architecture record is damaged ({error!r}); save it again."
        ) from error
    for name, value in sizes.items():
        if not 0 <= value <= RECORD_LIMITS[name]:
            raise CheckpointError(
                f"The checkpoint's record describes a network with {value:,} {name.replace('_', ' ')} (at "
                f"most {RECORD_LIMITS[name]:,} make sense); the record is damaged or was edited: save the "
                "model again."
            )
    if checkpoint.source_format != FORMAT_TAG:
        return  # a foreign file's record is read off its tensors: it fits them
    named = name_for_config(backbone)
    with torch.device("meta"):
        probe = _construct(info)
    wanted = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    held = {k: tuple(v.shape) for k, v in checkpoint.state_dict.items()}
    if wanted != held:
        key = next(k for k in sorted(set(wanted) | set(held)) if wanted.get(k) != held.get(k))
        record, file = wanted.get(key, "no tensor"), held.get(key, "no tensor")
        raise CheckpointError(
            f"The checkpoint's record describes {_describe(named, backbone)} but its tensors are "
            f"{_tensors_described(checkpoint.state_dict)} ({key}: the record gives {record}, the file "
            f"{file}); the record is damaged or was edited: save the model again."
        )
    expected = None if named is None else (f"pspnet_{named}" if info.module_type == "PSPNet" else named)
    if info.model_name is not None and info.model_name != expected:
        architecture = f"that of {expected}" if expected else "no named model's"
        raise CheckpointError(
            f"The checkpoint's record names the model {info.model_name!r} but its architecture is "
            f"{architecture}; the record is damaged or was edited: save the model again."
        )


def _tensors_described(state: Mapping[str, Tensor]) -> str:
    """What network a state dict's shapes are (its registry name where it has one)."""
    inner = {
        k.removeprefix("backbone."): v
        for k, v in state.items()
        if not k.startswith(("ppm.", "head.", "aux_head."))
    }
    try:
        config = infer_architecture(inner).config
    except CheckpointError:
        return "another network's"
    return f"{name_for_config(config) or _describe(None, config)}'s"


def label_model(model: RepVGG | PSPNet, info: ModelInfo) -> None:
    """Give ``model`` the name, class names and preprocessing of ``info``, where the record has them."""
    if isinstance(model, RepVGG):
        model.model_name = info.model_name or name_for_config(model.config)
    if info.class_names is not None:
        model.class_names = list(info.class_names)
    if info.preprocessing is not None:
        model.preprocessing = info.preprocessing
    if isinstance(model, RepVGG):
        model.runtime = info.runtime


def load_checkpoint(
    source: PathLike | Mapping[str, Any], model: nn.Module | None = None, *, adapt_in_chans: bool = False
) -> nn.Module:
    """Load a checkpoint in any known format; with ``model``, strictly into it, else into a new model.

    ``source`` is a path or a state dict: this package's safetensors files (an INT8 one loads as a
    :class:`repvgg.core.int8.QuantizedRepVGG`), a run's ``last.pt``, the authors' train- or deploy-time state
    dicts, timm's and mmpretrain's, with or without a ``module.`` prefix or a ``state_dict`` / ``model``
    wrapper; and ``.onnx`` files (an :class:`repvgg.io.onnxfile.OnnxModel`, run by onnxruntime). A
    mismatch raises :class:`CheckpointError` naming the likely cause and the first offending keys;
    nothing is loaded partially. With ``adapt_in_chans`` (fine-tuning pretrained weights on grey images, say)
    stem kernels for another number of input channels are adapted, with a warning (:func:`adapt_input_conv`).
    """
    if not isinstance(source, Mapping | str | os.PathLike):
        raise ArgumentTypeError(f"`source` must be a path or a state dict, got {type(source).__name__}.")
    if model is not None:
        arguments.module(model, "model")
    if not isinstance(source, Mapping) and Path(source).suffix.lower() == ".onnx":
        if model is None:
            return load_onnx(source)
        if file_kind(source) in ("onnx", "onnx-segmenter"):
            raise CheckpointError(f"{source} is an ONNX model: it runs as it is and loads into no `model`.")
        # named .onnx but no ONNX model: read by its content below, which says what it is
    raw, metadata = _read_source(source)
    if metadata.get("format") == INT8_FORMAT_TAG and model is None:
        return load_quantized(raw, metadata)
    checkpoint = _checkpoint_from(raw, metadata)
    if model is None:
        model = build_model(checkpoint)
    load_state_dict_strict(model, checkpoint, adapt_in_chans=adapt_in_chans)
    if isinstance(model, RepVGG | PSPNet):
        label_model(model, checkpoint.info)
    return model


def load_state_dict_strict(model: nn.Module, checkpoint: Checkpoint, *, adapt_in_chans: bool = False) -> None:
    """``model.load_state_dict(strict=True)``, with a one-sentence diagnosis instead of a key dump."""
    given = checkpoint.state_dict
    expected = model.state_dict()
    if adapt_in_chans:
        given = _with_adapted_stem(given, expected)
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


def _stem_keys_for_other_channels(given: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> list[str]:
    """The stem kernels that differ from the model's in their number of input channels only."""
    return [
        key
        for key, tensor in given.items()
        if key.startswith(CONVENTIONS["official"].stem + ".")
        and key in expected
        and tensor.ndim == 4
        and tensor.shape[1] != expected[key].shape[1]
        and (tensor.shape[0], *tensor.shape[2:]) == (expected[key].shape[0], *expected[key].shape[2:])
    ]


def _with_adapted_stem(given: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    keys = _stem_keys_for_other_channels(given, expected)
    if not keys:
        return given
    old, new = given[keys[0]].shape[1], expected[keys[0]].shape[1]
    warnings.warn(
        f"The checkpoint's stem takes {old} input channels and the model {new}: its kernels were "
        f"{'summed' if new == 1 else 'repeated and scaled'} to fit (timm's adapt_input_conv).",
        RepVGGWarning,
        stacklevel=4,
    )
    return {**given, **{key: adapt_input_conv(given[key], int(new)) for key in keys}}


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
    stem_only = set(mismatched) == set(
        _stem_keys_for_other_channels(checkpoint.state_dict, model.state_dict())
    )
    if mismatched and stem_only:
        return (
            "The checkpoint's stem was trained for another number of input channels than the model's; to "
            "fine-tune it on these images, load it with `adapt_in_chans` (timm's adapt_input_conv rule)."
        )
    checkpoint_block = (checkpoint.config or {}).get("block", "repvgg")
    model_block = model.block if isinstance(model, RepVGG) else checkpoint_block
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


# Safetensors holds plain tensors only: each quantized tensor is stored as its integer values plus its
# scales and zero points; the Linear's packed (weight, bias) pair as two entries.
_PARTS = "::"


def _flatten_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}

    def put(key: str, value: Tensor) -> dict[str, Any]:
        value = value.detach().cpu()
        if not value.is_quantized:
            tensors[key] = value.contiguous()
            return {"kind": "float"}
        tensors[key] = value.int_repr().contiguous()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[key + _PARTS + "scales"] = value.q_per_channel_scales().contiguous()
            tensors[key + _PARTS + "zero_points"] = value.q_per_channel_zero_points().contiguous()
            return {"kind": "per_channel", "axis": value.q_per_channel_axis(), "dtype": str(value.dtype)}
        return {
            "kind": "per_tensor",
            "scale": value.q_scale(),
            "zero_point": value.q_zero_point(),
            "dtype": str(value.dtype),
        }

    for key, value in state.items():
        if isinstance(value, Tensor):
            layout[key] = put(key, value)
        elif isinstance(value, tuple):
            layout[key] = {
                "kind": "tuple",
                "items": [None if v is None else put(f"{key}{_PARTS}{i}", v) for i, v in enumerate(value)],
            }
    return tensors, layout


def _rebuild(key: str, entry: dict[str, Any], tensors: dict[str, Tensor]) -> Tensor:
    values = tensors[key]
    if entry["kind"] == "float":
        return values
    if entry["kind"] == "per_channel":
        return torch._make_per_channel_quantized_tensor(
            values, tensors[key + _PARTS + "scales"], tensors[key + _PARTS + "zero_points"], entry["axis"]
        )
    return torch._make_per_tensor_quantized_tensor(values, entry["scale"], entry["zero_point"])


def _unflatten_state(tensors: dict[str, Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, entry in layout.items():
        if entry["kind"] == "tuple":
            state[key] = tuple(
                None if item is None else _rebuild(f"{key}{_PARTS}{i}", item, tensors)
                for i, item in enumerate(entry["items"])
            )
        else:
            state[key] = _rebuild(key, entry, tensors)
    return state


def _shapes(state: Mapping[str, Any]) -> dict[str, Any]:
    """The shape of every tensor of a (quantized) state dict; a packed pair's as a tuple. Quantized layers
    load any shape without a word, so the shapes are compared before loading."""

    def shape(value: Any) -> Any:
        if isinstance(value, Tensor):
            return tuple(value.shape)
        if isinstance(value, tuple):
            return tuple(shape(item) for item in value)
        return None

    return {key: shape(value) for key, value in state.items()}


def save_quantized(model: QuantizedRepVGG, path: PathLike) -> Path:
    """Write an INT8 RepVGG in this package's safetensors format (atomically), with its model record."""
    tensors, layout = _flatten_state(model.network.state_dict())
    metadata = {
        "format": INT8_FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        **model.info.to_metadata(),
        "engine": "x86",
        "method": model.method,
        "weights": model.weights,
        "activation_bits": str(model.activation_bits),
        "layout": json.dumps(layout),
    }
    path = Path(path)
    atomic_write(path, lambda target: save_file(tensors, str(target), metadata=metadata), what="the model")
    return path


def load_quantized(tensors: dict[str, Tensor], metadata: dict[str, str]) -> QuantizedRepVGG:
    """Rebuild an INT8 RepVGG from what :func:`save_quantized` wrote (see :func:`load_checkpoint`)."""
    _check_version(metadata)
    info = ModelInfo.from_metadata(metadata, form="deploy", precision="int8")
    if info.config is None:
        raise CheckpointError(
            "This INT8 checkpoint records no architecture; save it again with repvgg quantize."
        )
    template = RepVGG(**info.config, deploy=True)
    weights = metadata.get("weights", "per-channel")
    bits = 8 if metadata.get("activation_bits") == "8" else 7  # files before 0.1.1 used PyTorch's 7
    prepared = prepare_int8(template, example_input(template), qat=False, weights=weights)
    model = convert_int8(prepared, info, metadata.get("method", "ptq"), weights, bits)
    if bits == 8 and not cpu_features()["fast_int8"]:
        warnings.warn(
            "This INT8 model uses the full 8-bit activation range, made for CPUs with VNNI; this CPU has "
            "none, so its int8 sums may saturate: quantize the float checkpoint again on this machine.",
            RepVGGWarning,
            stacklevel=3,
        )
    state = _unflatten_state(tensors, json.loads(metadata["layout"]))
    expected = model.network.state_dict()
    missing = [k for k in expected if k not in state and isinstance(expected[k], Tensor | tuple)]
    if missing or set(state) - set(expected) or _shapes(state) != _shapes({k: expected[k] for k in state}):
        raise QuantizationError(
            "This INT8 checkpoint does not match the architecture it records; save it again with repvgg "
            "quantize."
        )
    expected.update(state)  # in place: the state dict's _metadata holds the layers' format versions
    try:
        with x86_engine():
            model.network.load_state_dict(expected, strict=True)
    except RuntimeError as error:
        raise QuantizationError(
            "This INT8 checkpoint's tensors do not fit the architecture it records; save it again with "
            "repvgg quantize."
        ) from error
    return model.eval()
