"""RepVGG: train a multi-branch network, convert it exactly into a plain 3x3 conv + ReLU stack.

Quick start::

    import repvgg
    model = repvgg.create_model("repvgg_a0", num_classes=10)
    ...  # train
    deployed = repvgg.reparameterize(model.eval())
    print(repvgg.verify_equivalence(model, deployed))
    repvgg.save_checkpoint(deployed, "a0_deploy.safetensors")
    again = repvgg.load_checkpoint("a0_deploy.safetensors")
"""

from repvgg.blocks import RepVGGBlock, SEBlock
from repvgg.checkpoints import Checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from repvgg.exceptions import (
    CheckpointError,
    ConversionError,
    ModelConfigError,
    RepVGGError,
    RepVGGWarning,
)
from repvgg.formats import convert_state_dict, detect_format
from repvgg.fusion import ConvBN
from repvgg.models import MODEL_SPECS, RepVGG, create_model, list_models
from repvgg.reparam import (
    EquivalenceReport,
    is_deployed,
    randomize_batchnorm_,
    reparameterize,
    repvgg_model_convert,
    verify_equivalence,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_SPECS",
    "Checkpoint",
    "CheckpointError",
    "ConvBN",
    "ConversionError",
    "EquivalenceReport",
    "ModelConfigError",
    "RepVGG",
    "RepVGGBlock",
    "RepVGGError",
    "RepVGGWarning",
    "SEBlock",
    "__version__",
    "convert_state_dict",
    "create_model",
    "detect_format",
    "is_deployed",
    "list_models",
    "load_checkpoint",
    "randomize_batchnorm_",
    "read_checkpoint",
    "reparameterize",
    "repvgg_model_convert",
    "save_checkpoint",
    "verify_equivalence",
]
