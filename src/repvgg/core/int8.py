"""The INT8 graph of a deployed RepVGG for the CPU, and post-training static quantization (PTQ).

The flow is PyTorch's FX graph mode with the ``x86`` quantized engine (fbgemm and oneDNN int8 kernels),
which ships with torch itself; PT2E, its successor, now lives in the separate ``torchao`` package. A
deployed RepVGG is first laid out as the plain stack it is (``Conv2d, ReLU, ...``, pooling, head), so
that every conv + ReLU pair becomes one fused int8 kernel. Weights are quantized per output channel
(symmetric int8), activations per tensor (uint8, histogram observers) from calibration images.

RepVGG's fused kernels are known to quantize badly (the QARepVGG and RepOpt papers); the ``qarepvgg``
block design keeps its accuracy, and quantization-aware training (``repvgg.studies.quantization``)
recovers what calibration alone loses. The INT8 file format lives in ``repvgg.io.checkpoints``.
"""

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from repvgg.core.blocks import form_of
from repvgg.core.info import ModelInfo, RecordBacked, model_info
from repvgg.core.models import RepVGG
from repvgg.core.reparam import to_deploy_form
from repvgg.exceptions import QuantizationError

ENGINE = "x86"


@contextlib.contextmanager
def x86_engine() -> Iterator[None]:
    """Run with the x86 quantized engine, without torch.ao's deprecation chatter."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINE
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quant_min and quant_max.*")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            warnings.filterwarnings("ignore", message=".*must run observer before calling.*")
            yield
    finally:
        torch.backends.quantized.engine = previous


def plain_network(model: nn.Module) -> nn.Sequential:
    """A deployed RepVGG laid out as what it is: ``Conv2d, ReLU, ..., AdaptiveAvgPool2d, Flatten, head``.

    Shares the model's layers (no copy). Training-form models are refused: convert them first.
    """
    if not isinstance(model, RepVGG):
        raise QuantizationError(
            f"INT8 quantization takes a RepVGG network, not a {type(model).__name__}; "
            "load it with repvgg.load_checkpoint."
        )
    if form_of(model) != "deploy":
        raise QuantizationError(
            "This model is in training form: convert it first (repvgg convert, or repvgg.reparameterize)."
        )
    if model.use_se:
        raise QuantizationError(
            "INT8 quantization supports RepVGG models without squeeze-and-excitation; D2se is not one."
        )
    layers: list[nn.Module] = []
    for stage in model.stages():
        for block in stage if isinstance(stage, nn.Sequential) else (stage,):
            layers += [block.rbr_reparam, nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.linear)


class QuantizedRepVGG(RecordBacked, nn.Module):
    """An INT8 RepVGG for the CPU, called like the float model (float images in, float logits out).

    ``network`` is the converted FX graph; ``info`` the record of the float model it was built from (with
    precision ``int8``); ``method`` says how it was quantized (``ptq`` or ``qat``).
    """

    def __init__(
        self,
        network: nn.Module,
        info: ModelInfo,
        *,
        method: str,
        weights: str = "per-channel",
        activation_bits: int = 7,
    ) -> None:
        super().__init__()
        if info.config is None:
            raise QuantizationError("An INT8 RepVGG needs the architecture of its float model in its record.")
        self.network = network
        self.info = info.replace(form="deploy", precision="int8", module_type=type(self).__name__)
        self.method = method
        self.weights = weights
        self.activation_bits = activation_bits

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.info.config or {})

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.device.type != "cpu":
            raise QuantizationError("INT8 RepVGG runs on the CPU: pass CPU tensors (device `cpu`).")
        with x86_engine(), torch.inference_mode():
            return self.network(inputs.float())

    def float_twin(self) -> RepVGG:
        """An untrained float deploy-form RepVGG of the same architecture (to count FLOPs, say)."""
        return RepVGG(**self.config, deploy=True).eval()

    def extra_repr(self) -> str:
        return (
            f"engine={ENGINE}, method={self.method}, weights={self.weights}, "
            f"activations={self.activation_bits}-bit"
        )


WEIGHT_GRANULARITIES = ("per-channel", "per-tensor")
#: Activation ranges: PyTorch's x86 default keeps 7 of the 8 bits (``reduce_range``), which CPUs without VNNI
#: need against overflow in their int8 dot products; with VNNI the full 8 bits are safe and, measured on
#: QARepVGG-A0 (RESULTS.md), lose 0.1-0.2 points where 7 bits lose 0.5-0.65.
ACTIVATION_BITS = (7, 8)


def _qconfig_mapping(qat: bool, weights: str, activation_bits: int = 7) -> Any:
    """x86's default mapping: uint8 activations (histogram observers, 7 bits used), int8 weights per
    channel; ``weights="per-tensor"`` gives one scale per weight tensor instead (the harsher setting that
    published RepVGG quantization results often use), ``activation_bits=8`` the full range (post-training
    quantization; see :data:`ACTIVATION_BITS`)."""
    from torch.ao.quantization import (
        HistogramObserver,
        QConfig,
        default_weight_fake_quant,
        default_weight_observer,
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )

    if weights not in WEIGHT_GRANULARITIES:
        raise QuantizationError(
            f"`weights` must be one of {', '.join(WEIGHT_GRANULARITIES)}, got {weights!r}."
        )
    if activation_bits not in ACTIVATION_BITS or (qat and activation_bits != 7):
        raise QuantizationError(
            f"`activation_bits` must be 7 or 8 (8 for post-training quantization only), got "
            f"{activation_bits}."
        )
    mapping = get_default_qat_qconfig_mapping(ENGINE) if qat else get_default_qconfig_mapping(ENGINE)
    if weights == "per-channel" and activation_bits == 7:
        return mapping
    weight = mapping.global_qconfig.weight
    if weights == "per-tensor":
        weight = default_weight_fake_quant if qat else default_weight_observer
    activation = mapping.global_qconfig.activation
    if activation_bits == 8:
        activation = HistogramObserver.with_args(reduce_range=False)
    return mapping.set_global(QConfig(activation=activation, weight=weight))


def prepare_int8(
    model: RepVGG, example: Tensor, *, qat: bool, weights: str, activation_bits: int = 7
) -> nn.Module:
    """The plain network of a float deploy copy of ``model`` with observers (and fake quantization)."""
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    deployed, _ = to_deploy_form(model)
    plain = plain_network(deployed).float().cpu()
    with x86_engine():
        if qat:
            for parameter in plain.parameters():
                parameter.requires_grad_(True)
            return prepare_qat_fx(plain.train(), _qconfig_mapping(True, weights), (example,))
        return prepare_fx(plain.eval(), _qconfig_mapping(False, weights, activation_bits), (example,))


def convert_int8(
    prepared: nn.Module, info: ModelInfo, method: str, weights: str, activation_bits: int = 7
) -> QuantizedRepVGG:
    """The INT8 network of observed (calibrated or QAT-trained) ``prepared``, with ``info`` as its record."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with x86_engine():
        network = convert_fx(prepared.eval())
    return QuantizedRepVGG(network, info, method=method, weights=weights, activation_bits=activation_bits)


def example_input(model: RepVGG, size: int = 32) -> Tensor:
    """A placeholder input to trace the graph with (the graph does not depend on its values or size)."""
    return torch.zeros(1, model.in_chans, size, size)


@torch.no_grad()
def quantize_ptq(
    model: RepVGG, calibration: Iterable[Tensor], *, weights: str = "per-channel", activation_bits: int = 7
) -> QuantizedRepVGG:
    """Post-training static quantization: observe activation ranges on ``calibration`` batches, using
    ``activation_bits`` of uint8 (8 for CPUs with VNNI; see :data:`ACTIVATION_BITS`).

    ``model`` may be in training form (it is converted on a copy) but not be D2se; it is not changed.
    """
    prepared: nn.Module | None = None
    images = 0
    for batch in calibration:
        if prepared is None:
            prepared = prepare_int8(
                model, batch[:1].float().cpu(), qat=False, weights=weights, activation_bits=activation_bits
            )
        with x86_engine():
            prepared(batch.float().cpu())
        images += len(batch)
    if prepared is None or images == 0:
        raise QuantizationError(
            "No calibration images were given; give at least one batch (a few hundred images is typical)."
        )
    return convert_int8(prepared, model_info(model), "ptq", weights, activation_bits)
