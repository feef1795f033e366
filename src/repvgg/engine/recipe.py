"""The pieces of a training recipe that are chosen by name: the optimizer, its learning-rate rule, the
learning-rate schedule, and the batch mixing (MixUp / CutMix).

Optimizers come from PyTorch (SGD, AdamW) and timm (LAMB, LARS, installed with ``repvgg[train]``); the mixing
from ``torchvision.transforms.v2``. The schedule is one function of the optimizer step, so that a resumed run
(even one given more epochs) goes on from the step it reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repvgg.core.repopt import (
    DEFAULT_SCALE_RULE,
    BranchScales,
    gradient_multiplier,
    initialize_like_csla,
    repopt_blocks,
    repopt_conv,
    rule_scales,
)
from repvgg.exceptions import ModelConfigError, TrainingError

#: Each optimizer's default learning rate: ``rate x effective batch / batch`` (the linear scaling rule):
#: SGD's is the paper's (0.1 per 256 images), AdamW's DeiT's, LAMB's timm's "ResNet strikes back" A1 recipe,
#: and LARS takes SGD's (its trust ratio scales each layer's step).
LR_RULES: dict[str, tuple[float, int]] = {
    "sgd": (0.1, 256),
    "lars": (0.1, 256),
    "adamw": (5e-4, 512),
    "lamb": (5e-3, 2048),
}


def default_lr(optimizer: str, effective_batch: int) -> float:
    """The learning rate of :data:`LR_RULES` for ``effective_batch`` images per optimizer step."""
    rate, batch = LR_RULES[optimizer]
    return rate * effective_batch / batch


def lr_rule(optimizer: str) -> str:
    """The rule of :func:`default_lr` in words, for a run's header."""
    rate, batch = LR_RULES[optimizer]
    return f"{rate:g} x effective batch / {batch}, {optimizer}'s rule"


def parameter_groups(
    model: nn.Module, weight_decay: float, custom_l2: bool, head_lr: float | None = None
) -> list[dict[str, Any]]:
    """The authors' weight-decay exclusions: none on biases and on the 3x3/1x1 branches' BN weights.

    The identity branch's BN weight keeps its decay; the online block's branch scales, which stand for the
    branches' BNs, have none. With ``custom_l2`` the two branch kernels are
    regularised through the loss instead, so they get no decay here either. With ``head_lr`` the classifier
    head (``linear``) gets groups of its own at that learning rate (fine-tuning often trains a new head
    faster than the pretrained body). Frozen parameters are left out.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        branch_kernel = name.endswith(("rbr_dense.conv.weight", "rbr_1x1.conv.weight"))
        scale = name.endswith(
            (".scale_dense", ".scale_1x1", ".scale_identity")
        )  # the online block's, BN-like
        decays = not (name.endswith("bias") or ".bn." in name or scale or (custom_l2 and branch_kernel))
        head = head_lr is not None and name.startswith("linear.")
        groups.setdefault((head, decays), []).append(parameter)
    return [
        {
            "params": groups.get((head, decays), []),
            "weight_decay": weight_decay if decays else 0.0,
            **({"lr": head_lr} if head else {}),
        }
        for head in ((False, True) if head_lr is not None else (False,))
        for decays in (True, False)
        if groups.get((head, decays)) or not head  # the body's two groups always, as before
    ]


def build_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, *, momentum: float = 0.9, nesterov: bool = False
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (sgd, adamw, lamb, lars) over parameter groups that carry their weight decay."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name in ("lamb", "lars"):
        try:
            from timm.optim import Lamb, Lars
        except ImportError as error:
            raise TrainingError(
                f"The {name.upper()} optimizer comes from timm, which is not installed: install it with "
                "pip install 'repvgg[train]', or choose `opt` sgd or adamw."
            ) from error
        return Lamb(groups, lr=lr) if name == "lamb" else Lars(groups, lr=lr, momentum=momentum)
    raise ModelConfigError(f"Unknown optimizer {name!r}: choose sgd, adamw, lamb or lars.")


@dataclass(frozen=True)
class LRSchedule:
    """The one learning-rate schedule: the factor of the peak learning rate at each optimizer step.

    A linear warm-up over ``warmup_steps``, then ``shape``: ``cosine`` annealing, ``poly``
    ``(1 - progress) ** power`` (segmentation), or ``step`` (times ``decay_rate`` every ``step_every`` steps),
    each ending at ``min_factor`` (the lowest learning rate over the peak). ``onecycle`` is Smith's one-cycle
    policy as PyTorch's ``OneCycleLR``: a cosine rise from 1/25 of the peak over the warm-up (30% of the steps
    when none is given), then a cosine fall to 1/25 x 1e-4 of the peak.
    """

    total_steps: int
    warmup_steps: int = 0
    shape: str = "cosine"
    power: float = 0.9
    min_factor: float = 0.0
    step_every: int = 1
    decay_rate: float = 0.1

    SHAPES = ("cosine", "poly", "step", "onecycle")
    ONE_CYCLE_START = 1 / 25  # PyTorch's OneCycleLR div_factor 25, final_div_factor 1e4
    ONE_CYCLE_END = 1 / 25 / 1e4

    def __post_init__(self) -> None:
        if self.shape not in self.SHAPES:
            raise ModelConfigError(f"Unknown schedule shape {self.shape!r}: choose {', '.join(self.SHAPES)}.")

    def __call__(self, step: int) -> float:
        if self.shape == "onecycle":
            return self._one_cycle(step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.shape == "step":  # decays counted from the first step, warm-up included (as timm's)
            return max(self.min_factor, self.decay_rate ** (step // max(1, self.step_every)))
        if self.shape == "poly":
            decay = (1 - progress) ** self.power
        else:
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_factor + (1 - self.min_factor) * decay

    def _one_cycle(self, step: int) -> float:
        rise = self.warmup_steps or max(1, round(0.3 * self.total_steps))
        if step < rise:
            low, high, progress = self.ONE_CYCLE_START, 1.0, step / rise
        else:
            low, high = 1.0, self.ONE_CYCLE_END
            progress = min(1.0, (step - rise) / max(1, self.total_steps - rise))
        return high + (low - high) * 0.5 * (1 + math.cos(math.pi * progress))


BatchMixing = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixing(
    num_classes: int, mixup: float, cutmix: float, prob: float = 1.0, switch_prob: float = 0.5
) -> BatchMixing | None:
    """MixUp and/or CutMix of a batch (torchvision v2), as timm's ``Mixup``: a share ``prob`` of batches is
    mixed; with both, a mixed batch uses CutMix with probability ``switch_prob``. None when neither is on.

    A batch left unmixed keeps its integer labels; a mixed one gets soft labels (the loss takes both)."""
    from torchvision.transforms import v2

    chosen = []
    if mixup > 0:
        chosen.append(
            (v2.MixUp(alpha=mixup, num_classes=num_classes), 1 - switch_prob if cutmix > 0 else 1.0)
        )
    if cutmix > 0:
        chosen.append((v2.CutMix(alpha=cutmix, num_classes=num_classes), switch_prob if mixup > 0 else 1.0))
    if not chosen:
        return None
    transforms, weights = zip(*chosen, strict=True)
    mixing = transforms[0] if len(transforms) == 1 else v2.RandomChoice(list(transforms), p=list(weights))
    return mixing if prob >= 1 else v2.RandomApply([mixing], p=prob)


#: A parameter and the factor of its gradient (RepOpt-VGG's gradient multipliers).
GradientMultipliers = list[tuple[nn.Parameter, torch.Tensor]]


def repopt_multipliers(
    model: nn.Module, *, initialize: bool, scales: Mapping[str, BranchScales] | None = None
) -> GradientMultipliers:
    """The gradient multipliers of every ``repopt`` block of ``model`` (see :mod:`repvgg.core.repopt`), from
    ``scales`` by block name (an online run's learned scales, :func:`~repvgg.core.repopt.searched_scales`,
    or a rule's, :func:`~repvgg.core.repopt.rule_scales`; default: the paper's constants), after giving each
    plain kernel the initial value of its multi-branch block when ``initialize`` (a run from scratch: not
    one started from a checkpoint or resumed)."""
    chosen = scales if scales is not None else rule_scales(model, DEFAULT_SCALE_RULE)
    multipliers = []
    for name, block in repopt_blocks(model).items():
        if initialize:
            initialize_like_csla(block, chosen[name])
        multipliers.append((repopt_conv(block).weight, gradient_multiplier(block, chosen[name])))
    return multipliers
