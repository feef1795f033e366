"""From a trained checkpoint to a deploy-form checkpoint: convert and verify, in float64.

A conversion is verified before anything is written, and files are written beside their destination and
renamed into place, so a failed step never leaves a damaged file behind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from repvgg.core.info import model_info
from repvgg.core.models import DEFAULT_STRIDES, RepVGG
from repvgg.core.reparam import (
    EquivalenceReport,
    refuse_nonfinite,
    reparameterize,
    tolerance_for,
    verify_equivalence,
)
from repvgg.exceptions import ConversionError
from repvgg.io.checkpoints import (
    Checkpoint,
    build_model,
    load_state_dict_strict,
    read_checkpoint,
    require_kind,
    save_checkpoint,
)
from repvgg.io.files import PathLike, atomic_write, refuse_same_file
from repvgg.io.formats import convert_state_dict
from repvgg.runtime.names import OUTPUT_FORMATS

CONVERTIBLE = ("classifier", "segmenter")  # the float networks with a training form


def _train_form_model(checkpoint: Checkpoint, source: PathLike) -> RepVGG:
    if checkpoint.form != "train":
        raise ConversionError(
            f"{source} is already a deploy-form checkpoint; convert the training-form checkpoint instead "
            "(e.g. model_train.safetensors)."
        )
    model = build_model(checkpoint)
    load_state_dict_strict(model, checkpoint)
    refuse_nonfinite(model, str(source))
    return model.eval()


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    output_format: str
    source_format: str
    report: EquivalenceReport
    note: str | None = None


def convert_checkpoint(source: PathLike, output: PathLike, *, to: str = "repvgg") -> ConversionResult:
    """Convert a training-form checkpoint (any format the package reads) into a deploy-form file.

    The fusion is computed in float64 and checked there on random input: if the largest relative
    difference exceeds 1e-10 nothing is written. The weights are then rounded once to float32. ``to``
    picks the key names: ``repvgg`` (our safetensors with metadata), or ``official`` / ``timm`` (a plain
    state dict, as a ``.safetensors`` file when ``output`` ends so, else ``torch.save``).
    """
    refuse_same_file(source, output, ConversionError)
    if to not in OUTPUT_FORMATS:
        raise ConversionError(f"Unknown output format {to!r}: choose one of {', '.join(OUTPUT_FORMATS)}.")
    require_kind(source, CONVERTIBLE, "conversion", ConversionError)
    checkpoint = read_checkpoint(source)
    model = _train_form_model(checkpoint, source).double()
    deployed = reparameterize(model)
    report = verify_equivalence(model, deployed, dtype=torch.float64, tolerance=tolerance_for(torch.float64))
    if not report.passed:
        raise ConversionError(
            f"The conversion of {source} is not exact ({report}); nothing was written. Please report this "
            "with the checkpoint."
        )
    deployed = deployed.float()
    path = Path(output)
    if to == "repvgg":
        save_checkpoint(deployed, path)
        note = None
    else:
        write_state_dict(convert_state_dict(deployed.state_dict(), to=to), path)
        note = _unrecorded(deployed, to)
    return ConversionResult(path, to, checkpoint.source_format, report, note)


def _unrecorded(model: RepVGG, to: str) -> str | None:
    """What a plain state dict cannot hold about ``model``, for its users to pass back by hand."""
    lost = []
    if model.strides != DEFAULT_STRIDES:
        lost.append(f"the strides {model.strides} (pass strides= to repvgg.create_model)")
    if model.class_names or model.preprocessing:
        lost.append("the class names and preprocessing")
    return f"the {to} format holds weights only, without {' or '.join(lost)}" if lost else None


def write_state_dict(state: dict[str, Tensor], path: Path) -> None:
    """A plain state dict, the way other ecosystems store one: safetensors by suffix, else torch.save."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda target: save_file(tensors, str(target)))
    else:
        atomic_write(path, lambda target: torch.save(tensors, target))


def repvgg_model_convert(model: nn.Module, save_path: str | None = None, do_copy: bool = True) -> nn.Module:
    """The authors' conversion entry point, kept so their scripts run after changing one import.

    ``save_path`` writes a deploy-form checkpoint in this package's format.
    """
    converted = reparameterize(model, inplace=not do_copy)
    if save_path is not None:
        save_checkpoint(converted, save_path)
    return converted


def verify_checkpoints(train_source: PathLike, deploy_source: PathLike | None = None) -> EquivalenceReport:
    """Check that a deploy-form checkpoint reproduces its training-form one, in float64.

    Without ``deploy_source`` the training-form checkpoint is checked against its own conversion
    (tolerance 1e-10). With it, the stored deploy weights carry float32 rounding, so the tolerance is the
    float32 one (1e-4) for float32 files (both from ``repvgg.core.reparam.TOLERANCE``). The deploy weights
    are loaded into the training checkpoint's architecture, so a file in the authors' or timm's names
    (which record no strides) is checked as it will be used.
    """
    for source in (train_source, deploy_source):
        if source is not None:
            require_kind(source, CONVERTIBLE, "the check", ConversionError)
    trained = _train_form_model(read_checkpoint(train_source), train_source)
    if deploy_source is None:
        return verify_equivalence(trained, dtype=torch.float64, tolerance=tolerance_for(torch.float64))
    checkpoint = read_checkpoint(deploy_source)
    if checkpoint.form != "deploy":
        raise ConversionError(
            f"{deploy_source} is a training-form checkpoint; give the deploy-form one second, or leave it "
            "out to check the first against its own conversion."
        )
    if checkpoint.source_format == "repvgg" and checkpoint.config != trained.config:
        differ = sorted(
            k
            for k in {**trained.config, **checkpoint.config}
            if trained.config.get(k) != checkpoint.config.get(k)
        )
        raise ConversionError(
            f"{deploy_source} was saved for another architecture than {train_source} (their "
            f"{', '.join(differ)} differ); they are not a train/deploy pair."
        )
    deployed = build_model(dataclasses.replace(checkpoint, info=model_info(trained).replace(form="deploy")))
    load_state_dict_strict(deployed, checkpoint)
    return verify_equivalence(trained, deployed.eval(), dtype=torch.float64)
