"""RepVGG as a backbone: multi-scale features, dilation, frozen stages and frozen BatchNorm statistics.

``create_model(name, features_only=True, out_indices=(1, 2, 3, 4), output_stride=8)`` returns a
:class:`RepVGGFeatures`: the same network without its head, whose forward pass returns the outputs of the
chosen stages. Its module names are the classifier's, so a classification checkpoint loads into it (the
head is dropped with a warning), and :func:`repvgg.reparameterize` converts it like any RepVGG.
"""

import copy
import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from repvgg.core.models import RepVGG, dilated_strides, stage_widths
from repvgg.exceptions import ModelConfigError


class FeatureInfo(list[dict[str, Any]]):
    """timm's feature description: a list of ``{"num_chs", "reduction", "module"}`` per returned stage, with
    timm's accessors ``channels()``, ``reduction()`` and ``module_name()``."""

    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self]

    def reduction(self) -> list[int]:
        return [info["reduction"] for info in self]

    def module_name(self) -> list[str]:
        return [info["module"] for info in self]


class RepVGGFeatures(RepVGG):
    """A headless RepVGG returning a list of stage outputs (stage 0 is the stem, 4 the last stage).

    Args (besides :class:`RepVGG`'s):
        out_indices: the stages whose outputs ``forward`` returns, in order.
        norm_eval: keep every BatchNorm in eval mode while training (for small per-GPU batches).

    ``feature_info`` lists ``{"num_chs", "reduction", "module"}`` per returned stage (timm's convention).
    """

    def __init__(
        self,
        *args: Any,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        norm_eval: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs["num_classes"] = 0
        super().__init__(*args, **kwargs)
        if not out_indices or any(i not in range(5) for i in out_indices):
            raise ModelConfigError(f"out_indices must name stages 0-4, got {tuple(out_indices)}.")
        self.out_indices = tuple(out_indices)
        self.norm_eval = norm_eval
        widths = stage_widths(self.width_multiplier, self.base_channels)
        strides, _ = dilated_strides(self.strides, self.output_stride, self.dilation_mode)
        reductions = [math.prod(strides[: stage + 1]) for stage in range(5)]
        self.feature_info = FeatureInfo(
            {"num_chs": widths[i], "reduction": reductions[i], "module": f"stage{i}"}
            for i in self.out_indices
        )

    def train(self, mode: bool = True) -> "RepVGGFeatures":
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def __prepare_scriptable__(self) -> nn.Module:
        return ScriptableFeatures(copy.deepcopy(self))

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        outputs = []
        for index, stage in enumerate(self.stages()):
            x = self.run_stage(stage, x)
            if index in self.out_indices:
                outputs.append(x)
        return outputs


class ScriptableFeatures(nn.Module):
    """A :class:`RepVGGFeatures` (a copy) as TorchScript compiles it: the chosen stages' outputs."""

    __constants__ = ("out_indices",)

    def __init__(self, model: RepVGGFeatures) -> None:
        super().__init__()
        self.stages = nn.ModuleList(model.stages())
        self.out_indices = model.out_indices

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs: list[Tensor] = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.out_indices:
                outputs.append(x)
        return outputs
