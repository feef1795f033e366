"""RepVGG: train a multi-branch network, convert it exactly into a plain 3x3 conv + ReLU stack.

Quick start::

    import repvgg
    model = repvgg.create_model("repvgg_a0", num_classes=10)
    ...  # train
    deployed = repvgg.reparameterize(model.eval())
    print(repvgg.verify_equivalence(model, deployed))
    repvgg.save_checkpoint(deployed, "a0_deploy.safetensors")
    again = repvgg.load_checkpoint("a0_deploy.safetensors")

The names below are imported on first use, so that ``import repvgg`` (and the command line's start-up)
does not pay for importing torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "repvgg.core.blocks": ("RepVGGBlock", "SEBlock"),
    "repvgg.core.fusion": ("ConvBN",),
    "repvgg.core.info": ("ModelInfo", "Preprocessing", "model_info"),
    "repvgg.core.models": ("RepVGG",),
    "repvgg.core.registry": ("MODEL_SPECS", "list_models"),
    "repvgg.core.reparam": (
        "EquivalenceReport",
        "is_deployed",
        "randomize_batchnorm_",
        "reparameterize",
        "verify_equivalence",
    ),
    "repvgg.exceptions": (
        "ArgumentTypeError",
        "ArgumentValueError",
        "CheckpointError",
        "ConversionError",
        "ExportError",
        "InferenceError",
        "ModelConfigError",
        "RepVGGError",
        "RepVGGWarning",
    ),
    "repvgg.io.checkpoints": ("Checkpoint", "load_checkpoint", "read_checkpoint", "save_checkpoint"),
    "repvgg.io.formats": ("convert_state_dict", "detect_format"),
    "repvgg.io.pretrained": ("create_model", "load_pretrained"),
    "repvgg.runtime.convert": ("convert_checkpoint", "repvgg_model_convert", "verify_checkpoints"),
    "repvgg.runtime.export": ("export_model",),
    "repvgg.runtime.optimize": ("OptimizedModel", "optimize"),
    "repvgg.runtime.predict": ("predict",),
    "repvgg.core.segmentation": ("PSPNet", "pspnet"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "MODEL_SPECS",
    "ArgumentTypeError",
    "ArgumentValueError",
    "Checkpoint",
    "CheckpointError",
    "ConvBN",
    "ConversionError",
    "EquivalenceReport",
    "ExportError",
    "InferenceError",
    "ModelConfigError",
    "ModelInfo",
    "OptimizedModel",
    "PSPNet",
    "Preprocessing",
    "RepVGG",
    "RepVGGBlock",
    "RepVGGError",
    "RepVGGWarning",
    "SEBlock",
    "__version__",
    "convert_checkpoint",
    "convert_state_dict",
    "create_model",
    "detect_format",
    "export_model",
    "is_deployed",
    "list_models",
    "load_checkpoint",
    "load_pretrained",
    "model_info",
    "optimize",
    "predict",
    "pspnet",
    "randomize_batchnorm_",
    "read_checkpoint",
    "reparameterize",
    "repvgg_model_convert",
    "save_checkpoint",
    "verify_checkpoints",
    "verify_equivalence",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'repvgg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from repvgg.core.blocks import RepVGGBlock, SEBlock
    from repvgg.core.fusion import ConvBN
    from repvgg.core.info import ModelInfo, Preprocessing, model_info
    from repvgg.core.models import RepVGG
    from repvgg.core.registry import MODEL_SPECS, list_models
    from repvgg.core.reparam import (
        EquivalenceReport,
        is_deployed,
        randomize_batchnorm_,
        reparameterize,
        verify_equivalence,
    )
    from repvgg.core.segmentation import PSPNet, pspnet
    from repvgg.exceptions import (
        ArgumentTypeError,
        ArgumentValueError,
        CheckpointError,
        ConversionError,
        ExportError,
        InferenceError,
        ModelConfigError,
        RepVGGError,
        RepVGGWarning,
    )
    from repvgg.io.checkpoints import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
    from repvgg.io.formats import convert_state_dict, detect_format
    from repvgg.io.pretrained import create_model, load_pretrained
    from repvgg.runtime.convert import convert_checkpoint, repvgg_model_convert, verify_checkpoints
    from repvgg.runtime.export import export_model
    from repvgg.runtime.optimize import OptimizedModel, optimize
    from repvgg.runtime.predict import predict
