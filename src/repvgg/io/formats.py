"""The key names of the RepVGG checkpoints users already hold, and conversion between them.

Every key of a RepVGG state dict names a *block* (stage 0, or block ``i`` of stage ``k``), a *role*
inside it (3x3 conv or its BN, 1x1 conv or its BN, identity BN, fused conv, SE convs) and a tensor, or
else the classifier head. The conventions below spell those three parts differently; parsing into the
parts and spelling them again converts any convention into any other.

This package's own modules carry the authors' names, so ``native`` and ``official`` keys are the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import Tensor

from repvgg.core.models import stage_widths
from repvgg.exceptions import CheckpointError

ROLES = ("dense.conv", "dense.bn", "1x1.conv", "1x1.bn", "identity", "reparam", "se.down", "se.up")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class KeyConvention:
    """How one code base spells block paths, roles and the head."""

    name: str
    stem: str
    stage_block: str  # format string with {stage} (1-4) and {index}
    stage_offset: int  # subtracted from our stage number (timm counts stages from 0)
    roles: Mapping[str, str]
    head: str

    @cached_property
    def block_regex(self) -> re.Pattern[str]:
        pattern = re.escape(self.stage_block).replace(r"\{stage\}", r"(\d+)")
        return re.compile("^" + pattern.replace(r"\{index\}", r"(\d+)") + r"\.")

    def block_path(self, stage: int, index: int | None) -> str:
        if stage == 0:
            return self.stem
        return self.stage_block.format(stage=stage - self.stage_offset, index=index)


CONVENTIONS: dict[str, KeyConvention] = {
    "official": KeyConvention(
        name="official",
        stem="stage0",
        stage_block="stage{stage}.{index}",
        stage_offset=0,
        roles={
            "dense.conv": "rbr_dense.conv",
            "dense.bn": "rbr_dense.bn",
            "1x1.conv": "rbr_1x1.conv",
            "1x1.bn": "rbr_1x1.bn",
            "identity": "rbr_identity",
            "reparam": "rbr_reparam",
            "se.down": "se.down",
            "se.up": "se.up",
        },
        head="linear",
    ),
    "timm": KeyConvention(
        name="timm",
        stem="stem",
        stage_block="stages.{stage}.{index}",
        stage_offset=1,
        roles={
            "dense.conv": "conv_kxk.conv",
            "dense.bn": "conv_kxk.bn",
            "1x1.conv": "conv_1x1.conv",
            "1x1.bn": "conv_1x1.bn",
            "identity": "identity",
            "reparam": "reparam_conv",
            "se.down": "attn.fc1",
            "se.up": "attn.fc2",
        },
        head="head.fc",
    ),
    "mmpretrain": KeyConvention(
        name="mmpretrain",
        stem="backbone.stem",
        stage_block="backbone.stage_{stage}.{index}",
        stage_offset=0,
        roles={
            "dense.conv": "branch_3x3.conv",
            "dense.bn": "branch_3x3.norm",
            "1x1.conv": "branch_1x1.conv",
            "1x1.bn": "branch_1x1.norm",
            "identity": "branch_norm",
            "reparam": "branch_reparam",
            "se.down": "se_layer.conv1.conv",
            "se.up": "se_layer.conv2.conv",
        },
        head="head.fc",
    ),
}
TARGETS = ("native", "official", "timm", "mmpretrain")


@dataclass(frozen=True)
class ParsedKey:
    """One state-dict key split into block, role and tensor name (``stage`` is None for the head)."""

    stage: int | None
    index: int | None
    role: str | None
    tensor: str

    def spell(self, convention: KeyConvention) -> str:
        if self.stage is None:
            return f"{convention.head}.{self.tensor}"
        block = convention.block_path(self.stage, self.index)
        return f"{block}.{convention.roles[self.role]}.{self.tensor}"  # type: ignore[index]


def parse_key(key: str, convention: KeyConvention) -> ParsedKey | None:
    """Split ``key`` by ``convention``; None when the key is not one of its RepVGG keys."""
    if key.startswith(convention.head + "."):
        return ParsedKey(None, None, None, key[len(convention.head) + 1 :])
    if key.startswith(convention.stem + "."):
        stage, index, rest = 0, None, key[len(convention.stem) + 1 :]
    else:
        match = convention.block_regex.match(key)
        if match is None:
            return None
        stage = int(match.group(1)) + convention.stage_offset
        index, rest = int(match.group(2)), key[match.end() :]
        if not 1 <= stage <= 4:
            return None
    for role, prefix in sorted(convention.roles.items(), key=lambda item: -len(item[1])):
        if rest.startswith(prefix + "."):
            return ParsedKey(stage, index, role, rest[len(prefix) + 1 :])
    return None


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """The tensors of a state dict, found inside the usual wrappers, with training prefixes removed.

    Accepts a plain state dict, or a dict holding it under ``state_dict``, ``model``,
    ``model_state_dict`` or ``module`` (training scripts' and mmpretrain's files); removes a ``module.``
    (DataParallel / DDP) or ``_orig_mod.`` (torch.compile) prefix carried by every key.
    """
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise CheckpointError(
            "The file holds no state dict of tensors (looked at the top level and under "
            f"{', '.join(WRAPPER_KEYS)}); it is not a model checkpoint."
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _is_tensor_dict(obj: Mapping[Any, Any]) -> bool:
    values = list(obj.values())
    return bool(values) and sum(isinstance(v, Tensor) for v in values) * 2 > len(values)


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """``official`` (the authors' names, also ours), ``timm`` or ``mmpretrain``.

    Raises :class:`CheckpointError` when no convention explains the keys.
    """
    best, best_count = None, 0
    for name, convention in CONVENTIONS.items():
        parsed = [parse_key(k, convention) for k in state_dict]
        blocks = sum(p is not None and p.stage is not None for p in parsed)
        if blocks > best_count:
            best, best_count = name, blocks
    if best is None:
        sample = ", ".join(list(state_dict)[:3])
        raise CheckpointError(
            "No RepVGG keys found: this is not a checkpoint in a known format (this package's, the "
            f"authors', timm's or mmpretrain's); its first keys are {sample}."
        )
    return best


def convert_state_dict(state_dict: Mapping[str, Any], to: str = "native") -> dict[str, Tensor]:
    """Rename a RepVGG state dict in any known convention into ``to``.

    ``to`` is ``native`` or ``official`` (the same names: the authors'), ``timm`` or ``mmpretrain``.
    The input may be wrapped or prefixed as :func:`unwrap_state_dict` accepts. Tensors are shared, not
    copied. Keys that are not part of a RepVGG network are refused with their names.
    """
    if to not in TARGETS:
        raise CheckpointError(f"Unknown target format {to!r}: choose one of {', '.join(TARGETS)}.")
    state = unwrap_state_dict(state_dict)
    source = CONVENTIONS[detect_format(state)]
    target = CONVENTIONS["official" if to == "native" else to]
    converted: dict[str, Tensor] = {}
    foreign: list[str] = []
    for key, tensor in state.items():
        parsed = parse_key(key, source)
        if parsed is None:
            foreign.append(key)
        else:
            converted[parsed.spell(target)] = tensor
    if foreign:
        raise CheckpointError(
            f"The {source.name} checkpoint has keys that belong to no RepVGG block or head "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); it holds another "
            "network, or a RepVGG inside a larger one: load it into that network with model=."
        )
    return converted


@dataclass(frozen=True)
class InferredArchitecture:
    """What a native-keyed state dict says about the network that produced it."""

    config: dict[str, Any]
    form: str  # "train" or "deploy"


def infer_architecture(state_dict: Mapping[str, Tensor]) -> InferredArchitecture:
    """Read the RepVGG constructor arguments off the tensor shapes of a native-keyed state dict.

    Strides cannot be seen in weights; the paper's are assumed.
    """
    convention = CONVENTIONS["official"]
    kernels: dict[tuple[int, int], Tensor] = {}
    roles: set[str] = set()
    head_weight = None
    for key, tensor in state_dict.items():
        parsed = parse_key(key, convention)
        if parsed is None:
            continue
        if parsed.stage is None:
            if parsed.tensor == "weight":
                head_weight = tensor
            continue
        roles.add(parsed.role or "")
        if (parsed.role, parsed.tensor) in {("dense.conv", "weight"), ("reparam", "weight")}:
            kernels[(parsed.stage, -1 if parsed.index is None else parsed.index)] = tensor
    if "reparam" in roles and "dense.conv" in roles:
        raise CheckpointError(
            "The checkpoint mixes converted and unconverted blocks; convert the whole model before saving it."
        )
    if (0, -1) not in kernels:
        raise CheckpointError("The checkpoint has no stage-0 (stem) convolution; it is incomplete.")
    num_blocks = []
    for stage in range(1, 5):
        indices = sorted(i for s, i in kernels if s == stage)
        if indices != list(range(len(indices))) or not indices:
            raise CheckpointError(
                f"Stage {stage} of the checkpoint has blocks {indices}; it is incomplete or not RepVGG."
            )
        num_blocks.append(len(indices))
    widths = [int(kernels[(stage, 0)].shape[0]) for stage in range(1, 5)]
    multiplier = [widths[0] / 64, widths[1] / 128, widths[2] / 256, widths[3] / 512]
    stem = kernels[(0, -1)]
    if int(stem.shape[0]) != stage_widths(multiplier)[0]:
        raise CheckpointError(
            f"The checkpoint's stem has {stem.shape[0]} channels where RepVGG has "
            f"min(64, {widths[0]}); it is not a RepVGG network."
        )
    groups_map: dict[int, int] = {}
    in_channels = int(stem.shape[0])
    layer = 1
    for stage, depth in enumerate(num_blocks, start=1):
        for index in range(depth):
            kernel = kernels[(stage, index)]
            groups = in_channels // int(kernel.shape[1])
            if groups != 1:
                groups_map[layer] = groups
            in_channels = int(kernel.shape[0])
            layer += 1
    config = {
        "num_blocks": num_blocks,
        "width_multiplier": multiplier,
        "override_groups_map": groups_map,
        "use_se": "se.down" in roles,
        "num_classes": 0 if head_weight is None else int(head_weight.shape[0]),
        "in_chans": int(stem.shape[1]),
    }
    return InferredArchitecture(config=config, form="deploy" if "reparam" in roles else "train")
