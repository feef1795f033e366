"""The INT8 graph of a deployed RepVGG for the CPU, and post-training static quantization (PTQ).

The flow is PyTorch's FX graph mode with the ``x86`` quantized engine (fbgemm and oneDNN int8 kernels),
which ships with torch itself; PT2E, its successor, now lives in the separate ``torchao`` package. A
deployed RepVGG is first laid out as the plain stack it is (``Conv2d, ReLU, ...``, pooling, head), so
that every conv + ReLU pair becomes one fused int8 kernel. Weights are quantized per output channel
(symmetric int8), activations per tensor (uint8, histogram observers) from calibration images.

RepVGG's fused kernels are known to quantize badly (the QARepVGG and RepOpt papers); the ``qarepvgg``
block design keeps its accuracy, and quantization-aware training (``repvgg.studies.quantization``)
recovers what calibration alone loses. A deployed RepVGG has no BatchNorm left, which makes QAT of it
hard (the authors' repository, issue #85): :func:`with_batchnorm` puts one back after every conv, exactly
the identity at first, so that QAT runs the standard conv + BN recipe and the INT8 model folds it again.
The INT8 file format lives in ``repvgg.io.checkpoints``.
"""

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
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


@torch.no_grad()
def conv_output_statistics(
    plain: nn.Sequential, images: Iterable[Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per conv of ``plain`` (by name), the mean and (population) variance per channel of its output over
    ``images``, accumulated in float64 over every image and position."""
    convs = {name: layer for name, layer in plain.named_children() if isinstance(layer, nn.Conv2d)}
    sums: dict[str, Tensor] = {}
    count = {name: 0 for name in convs}

    def record(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(_: nn.Module, __: Any, output: Tensor) -> None:
            values = output.detach().double().transpose(0, 1).flatten(1)  # channels x (images . positions)
            moments = torch.stack([values.sum(1), values.square().sum(1)])
            sums[name] = sums[name] + moments if name in sums else moments
            count[name] += values.shape[1]

        return hook

    handles = [conv.register_forward_hook(record(name)) for name, conv in convs.items()]
    try:
        for batch in images:
            plain(batch.float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    if not sums:
        raise QuantizationError(
            "No images were given to measure the BatchNorm statistics with; give at least one batch."
        )
    statistics = {}
    for name, (total, squares) in sums.items():
        mean = total / count[name]
        statistics[name] = (mean, (squares / count[name] - mean.square()).clamp_min(0))
    return statistics


def with_batchnorm(plain: nn.Sequential, images: Iterable[Tensor]) -> nn.Sequential:
    """``plain`` with a BatchNorm2d after every conv, each the identity map in eval mode (for QAT).

    Each BatchNorm's running mean and variance are the statistics of its conv's output over ``images``, its
    gamma ``sqrt(variance + eps)`` and its beta the mean, so in eval mode it gives back its input exactly
    (to rounding). Unit statistics would be the identity in eval mode too, but measured ones are what make
    the start of QAT the plain network as well: in training mode each BatchNorm normalises with batch
    statistics close to the running ones, so the function barely moves, and the fused QAT conv's weight
    factor ``gamma / sqrt(running_var + eps)`` starts at 1, so fake quantization starts from the plain
    weights (those PTQ quantizes). The layers keep their names (a conv's BatchNorm is ``<name>_bn``), so the
    INT8 graph converted from it, BatchNorms folded, is laid out and saved like a post-training one.
    Shares ``plain``'s layers.
    """
    statistics = conv_output_statistics(plain.eval(), images)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, layer in plain.named_children():
        layers[name] = layer
        if name in statistics:
            mean, variance = statistics[name]
            norm = nn.BatchNorm2d(len(mean))
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(variance)
            with torch.no_grad():
                norm.weight.copy_((variance + norm.eps).sqrt())
                norm.bias.copy_(mean)
            layers[f"{name}_bn"] = norm
    return nn.Sequential(layers)


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
    """x86's default mapping: uint8 activations (7 bits used), int8 weights per channel; ``weights=
    "per-tensor"`` gives one scale per weight tensor instead (the harsher setting that published RepVGG
    quantization results often use), ``activation_bits=8`` the full range (see :data:`ACTIVATION_BITS`).
    Post-training quantization observes histograms, QAT moving min/max with fake quantization."""
    from torch.ao.quantization import (
        FusedMovingAvgObsFakeQuantize,
        HistogramObserver,
        MovingAverageMinMaxObserver,
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
    if activation_bits not in ACTIVATION_BITS:
        raise QuantizationError(f"`activation_bits` must be 7 or 8, got {activation_bits}.")
    mapping = get_default_qat_qconfig_mapping(ENGINE) if qat else get_default_qconfig_mapping(ENGINE)
    if weights == "per-channel" and activation_bits == 7:
        return mapping
    weight = mapping.global_qconfig.weight
    if weights == "per-tensor":
        weight = default_weight_fake_quant if qat else default_weight_observer
    activation = mapping.global_qconfig.activation
    if activation_bits == 8 and qat:
        activation = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=False
        )
    elif activation_bits == 8:
        activation = HistogramObserver.with_args(reduce_range=False)
    return mapping.set_global(QConfig(activation=activation, weight=weight))


def prepare_int8(
    model: RepVGG,
    example: Tensor,
    *,
    qat: bool,
    weights: str,
    activation_bits: int = 7,
    batchnorm_images: Iterable[Tensor] | None = None,
) -> nn.Module:
    """The plain network of a float deploy copy of ``model`` with observers (and fake quantization).

    With ``batchnorm_images`` (QAT only), a BatchNorm measured on them is put back after every conv
    (:func:`with_batchnorm`) and FX fuses each conv + BN + ReLU into one QAT module
    (``torch.ao.nn.intrinsic.qat.ConvBnReLU2d``), which fake-quantizes the weights with the BN folded in.
    """
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    deployed, _ = to_deploy_form(model)
    plain = plain_network(deployed).float().cpu()
    mapping = _qconfig_mapping(qat, weights, activation_bits)
    with x86_engine():
        if not qat:
            if batchnorm_images is not None:
                raise QuantizationError(
                    "BatchNorm is put back for quantization-aware training only: give `batchnorm_images` "
                    "with `qat=True`."
                )
            return prepare_fx(plain.eval(), mapping, (example,))
        for parameter in plain.parameters():
            parameter.requires_grad_(True)
        if batchnorm_images is not None:
            plain = with_batchnorm(plain, batchnorm_images)
        return prepare_qat_fx(plain.train(), mapping, (example,))


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
