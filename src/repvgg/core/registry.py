"""The registry of the paper's named models (and the authors' D2se), and ``create_model``."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from repvgg.core.arguments import switch, text
from repvgg.core.backbone import RepVGGFeatures
from repvgg.core.models import RepVGG
from repvgg.exceptions import ModelConfigError

#: 3x3 layers, numbered globally from the stem (layer 0), that the g2/g4 variants make grouped.
GROUPED_LAYERS = tuple(range(2, 27, 2))


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its RepVGG configuration and the top-1 the paper reports for it."""

    num_blocks: tuple[int, int, int, int]
    width_multiplier: tuple[float, float, float, float]
    groups: int = 1
    use_se: bool = False
    paper_top1: float | None = None
    top1_source: str = ""
    paper_params_m: float | None = None  # deploy-form parameters in millions, paper Table 4
    paper_speed: float | None = None  # examples/s of the deploy form on a GTX 1080Ti, batch 128 (Tables 4-5)
    override_groups_map: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        groups_map = {layer: self.groups for layer in GROUPED_LAYERS} if self.groups > 1 else {}
        object.__setattr__(self, "override_groups_map", groups_map)

    def constructor_kwargs(self) -> dict[str, Any]:
        return {
            "num_blocks": list(self.num_blocks),
            "width_multiplier": list(self.width_multiplier),
            "override_groups_map": dict(self.override_groups_map),
            "use_se": self.use_se,
        }


TABLE4 = "Table 4 (120 epochs, simple augmentation)"
TABLE5 = "Table 5 (200 epochs, AutoAugment + label smoothing + mixup)"
_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)

MODEL_SPECS: dict[str, ModelSpec] = {
    "repvgg_a0": ModelSpec(
        _A,
        (0.75, 0.75, 0.75, 2.5),
        paper_top1=72.41,
        top1_source=TABLE4,
        paper_params_m=8.3,
        paper_speed=3256,
    ),
    "repvgg_a1": ModelSpec(
        _A, (1, 1, 1, 2.5), paper_top1=74.46, top1_source=TABLE4, paper_params_m=12.78, paper_speed=2339
    ),
    "repvgg_a2": ModelSpec(
        _A,
        (1.5, 1.5, 1.5, 2.75),
        paper_top1=76.48,
        top1_source=TABLE4,
        paper_params_m=25.49,
        paper_speed=1322,
    ),
    "repvgg_b0": ModelSpec(
        _B, (1, 1, 1, 2.5), paper_top1=75.14, top1_source=TABLE4, paper_params_m=14.33, paper_speed=1817
    ),
    "repvgg_b1": ModelSpec(
        _B, (2, 2, 2, 4), paper_top1=78.37, top1_source=TABLE4, paper_params_m=51.82, paper_speed=685
    ),
    "repvgg_b1g2": ModelSpec(
        _B, (2, 2, 2, 4), 2, paper_top1=77.78, top1_source=TABLE4, paper_params_m=41.36, paper_speed=792
    ),
    "repvgg_b1g4": ModelSpec(
        _B, (2, 2, 2, 4), 4, paper_top1=77.58, top1_source=TABLE4, paper_params_m=36.12, paper_speed=868
    ),
    "repvgg_b2": ModelSpec(
        _B, (2.5, 2.5, 2.5, 5), paper_top1=78.78, top1_source=TABLE4, paper_params_m=80.31, paper_speed=460
    ),
    "repvgg_b2g2": ModelSpec(_B, (2.5, 2.5, 2.5, 5), 2),
    "repvgg_b2g4": ModelSpec(
        _B, (2.5, 2.5, 2.5, 5), 4, paper_top1=78.50, top1_source=TABLE4, paper_params_m=55.77, paper_speed=581
    ),
    "repvgg_b3": ModelSpec(_B, (3, 3, 3, 5), paper_top1=80.52, top1_source=TABLE5, paper_speed=363),
    "repvgg_b3g2": ModelSpec(_B, (3, 3, 3, 5), 2),
    "repvgg_b3g4": ModelSpec(_B, (3, 3, 3, 5), 4, paper_top1=80.21, top1_source=TABLE5, paper_speed=464),
    "repvgg_d2se": ModelSpec(
        (8, 14, 24, 1),
        (2.5, 2.5, 2.5, 5),
        use_se=True,
        paper_top1=81.82,
        top1_source="authors' README (200 epochs, tested at 224 px)",
    ),
}


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style ``pattern`` (timm's ``list_models("*b1*")``),
    in the paper's order."""
    return [name for name in MODEL_SPECS if fnmatch.fnmatchcase(name, text(pattern, "pattern").lower())]


def canonical_name(name: str) -> str:
    """``"RepVGG-B1g2"``, ``"b1g2"`` and ``"repvgg_b1g2"`` all name ``repvgg_b1g2``."""
    key = name.strip().lower().replace("-", "_")
    if not key.startswith("repvgg_"):
        key = "repvgg_" + key
    if key not in MODEL_SPECS:
        close = difflib.get_close_matches(key, MODEL_SPECS, n=1)
        hint = f"did you mean {close[0]}?" if close else "see repvgg.list_models()."
        raise ModelConfigError(f"Unknown model {name!r}: {hint}")
    return key


def create_model(
    name: str,
    num_classes: int = 1000,
    deploy: bool = False,
    in_chans: int = 3,
    features_only: bool = False,
    **options: Any,
) -> RepVGG:
    """Build a named model, in training form or (``deploy=True``) directly in its plain form.

    ``options`` are the other keyword arguments of :class:`RepVGG`: ``strides``, ``use_checkpoint``,
    ``block`` (e.g. ``create_model("a0", block="qarepvgg")``),
    ``output_stride``, ``dilation_mode`` and ``frozen_stages``. ``features_only=True`` builds the headless
    :class:`repvgg.core.backbone.RepVGGFeatures` (options ``out_indices``, ``norm_eval``).
    """
    if not isinstance(name, str):
        raise ModelConfigError(
            f"create_model takes a model name such as 'repvgg_a0', got {name!r}; build a custom network with "
            "repvgg.RepVGG(num_blocks, width_multiplier=...)."
        )
    key = canonical_name(name)
    architecture: type[RepVGG] = RepVGG
    if switch(features_only, "features_only"):
        architecture = RepVGGFeatures
    elif {"out_indices", "norm_eval"} & set(options):
        raise ModelConfigError("out_indices and norm_eval are backbone options: add features_only=True.")
    model = architecture(
        **MODEL_SPECS[key].constructor_kwargs(),
        num_classes=num_classes,
        deploy=deploy,
        in_chans=in_chans,
        **options,
    )
    model.model_name = key
    return model


def name_for_config(config: Mapping[str, Any]) -> str | None:
    """The registered name whose architecture equals ``config`` (see :attr:`RepVGG.config`), if any."""
    for name, spec in MODEL_SPECS.items():
        kwargs = spec.constructor_kwargs()
        if all(_same(config.get(k), v) for k, v in kwargs.items()):
            return name
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, dict):
        return isinstance(a, Mapping) and {int(k): int(v) for k, v in a.items()} == b
    if isinstance(b, list):
        return a is not None and [float(x) for x in a] == [float(x) for x in b]
    return a == b
