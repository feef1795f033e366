"""INT8 deployment on the CPU: post-training static quantization and quantization-aware training.

The flow is PyTorch's FX graph mode with the ``x86`` quantized engine (fbgemm and oneDNN int8 kernels),
which ships with torch itself; PT2E, its successor, now lives in the separate ``torchao`` package. A
deployed RepVGG is first laid out as the plain stack it is (``Conv2d, ReLU, ...``, pooling, head), so
that every conv + ReLU pair becomes one fused int8 kernel. Weights are quantized per output channel
(symmetric int8), activations per tensor (uint8, histogram observers) from calibration images.

RepVGG's fused kernels quantize badly (SPEC.md section 6); :data:`repvgg.blocks.BLOCK_DESIGNS`'s
``qarepvgg`` is the design that keeps its accuracy, and quantization-aware training (:func:`quantize_qat`)
recovers what calibration alone loses.

Quantized networks are saved in this package's safetensors format (``format = repvgg-int8``): int8
weights, their scales and zero points as plain tensors, and the float architecture to rebuild the graph.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from repvgg.checkpoints import PathLike, atomic_write
from repvgg.deploy import to_deploy_form
from repvgg.exceptions import QuantizationError
from repvgg.models import RepVGG

ENGINE = "x86"
FORMAT_TAG = "repvgg-int8"
FORMAT_VERSION = "1"


@contextlib.contextmanager
def _x86_engine() -> Iterator[None]:
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
    if not model.deploy:
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


class QuantizedRepVGG(nn.Module):
    """An INT8 RepVGG for the CPU, called like the float model (float images in, float logits out).

    ``network`` is the converted FX graph; ``config`` the float architecture (:attr:`RepVGG.config`) it
    was built from; ``method`` says how it was quantized (``ptq`` or ``qat``).
    """

    deploy = True

    def __init__(
        self,
        network: nn.Module,
        config: dict[str, Any],
        *,
        method: str,
        weights: str = "per-channel",
        model_name: str | None = None,
        class_names: list[str] | None = None,
        preprocessing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.config = dict(config)
        self.method = method
        self.weights = weights
        self.model_name = model_name
        self.class_names = class_names
        self.preprocessing = preprocessing
        self.in_chans = int(config["in_chans"])
        self.num_classes = int(config["num_classes"])

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.device.type != "cpu":
            raise QuantizationError("INT8 RepVGG runs on the CPU: pass CPU tensors (or --device cpu).")
        with _x86_engine(), torch.inference_mode():
            return self.network(inputs.float())

    def float_twin(self) -> RepVGG:
        """An untrained float deploy-form RepVGG of the same architecture (to count FLOPs, say)."""
        return RepVGG(**self.config, deploy=True).eval()

    def extra_repr(self) -> str:
        return f"engine={ENGINE}, method={self.method}, weights={self.weights}"


WEIGHT_GRANULARITIES = ("per-channel", "per-tensor")


def _qconfig_mapping(qat: bool, weights: str) -> Any:
    """x86's default mapping: uint8 activations (histogram observers), int8 weights per channel; with
    ``weights="per-tensor"`` one scale per weight tensor instead (the harsher setting that published
    RepVGG quantization results often use)."""
    from torch.ao.quantization import (
        QConfig,
        default_weight_fake_quant,
        default_weight_observer,
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )

    if weights not in WEIGHT_GRANULARITIES:
        raise QuantizationError(
            f"--weights must be one of {', '.join(WEIGHT_GRANULARITIES)}, got {weights!r}."
        )
    mapping = get_default_qat_qconfig_mapping(ENGINE) if qat else get_default_qconfig_mapping(ENGINE)
    if weights == "per-channel":
        return mapping
    weight = default_weight_fake_quant if qat else default_weight_observer
    return mapping.set_global(QConfig(activation=mapping.global_qconfig.activation, weight=weight))


def _prepare(model: RepVGG, example: Tensor, *, qat: bool, weights: str) -> nn.Module:
    """The plain network of a float deploy copy of ``model`` with observers (and fake quantization)."""
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    deployed, _ = to_deploy_form(model)
    plain = plain_network(deployed).float().cpu()
    with _x86_engine():
        if qat:
            for parameter in plain.parameters():
                parameter.requires_grad_(True)
            return prepare_qat_fx(plain.train(), _qconfig_mapping(True, weights), (example,))
        return prepare_fx(plain.eval(), _qconfig_mapping(False, weights), (example,))


def _convert(prepared: nn.Module, source: RepVGG, method: str, weights: str) -> QuantizedRepVGG:
    from torch.ao.quantization.quantize_fx import convert_fx

    with _x86_engine():
        network = convert_fx(prepared.eval())
    return QuantizedRepVGG(
        network,
        source.config,
        method=method,
        weights=weights,
        model_name=source.model_name,
        class_names=source.class_names,
        preprocessing=source.preprocessing,
    )


def _example(model: RepVGG, size: int = 32) -> Tensor:
    return torch.zeros(1, model.in_chans, size, size)


@torch.no_grad()
def quantize_ptq(
    model: RepVGG, calibration: Iterable[Tensor], *, weights: str = "per-channel"
) -> QuantizedRepVGG:
    """Post-training static quantization: observe activation ranges on ``calibration`` batches.

    ``model`` may be in training form (it is converted on a copy) but not be D2se; it is not changed.
    """
    prepared: nn.Module | None = None
    images = 0
    for batch in calibration:
        if prepared is None:
            prepared = _prepare(model, batch[:1].float().cpu(), qat=False, weights=weights)
        with _x86_engine():
            prepared(batch.float().cpu())
        images += len(batch)
    if prepared is None or images == 0:
        raise QuantizationError(
            "No calibration images were given; pass --calib N with N >= 1 (a few hundred is typical)."
        )
    return _convert(prepared, model, "ptq", weights)


def quantize_qat(
    model: RepVGG,
    train_batches: Collection[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    lr: float = 1e-3,
    freeze_observers_after: float = 0.5,
    weights: str = "per-channel",
    on_step: Callable[[float], None] | None = None,
) -> QuantizedRepVGG:
    """Quantization-aware fine-tuning of the deployed network, then conversion to INT8.

    Fake quantization in the forward pass lets the weights adapt to the int8 grid. SGD (momentum 0.9),
    ``lr`` cosine-annealed to 0 over ``epochs`` passes over ``train_batches`` (a DataLoader or a list,
    iterated once per epoch);
    the observers stop moving after ``freeze_observers_after`` of the steps so the last steps train
    against fixed scales.
    """
    if epochs < 1:
        raise QuantizationError("Quantization-aware training needs --qat-epochs of at least 1.")
    from torch.ao.quantization import disable_observer

    if len(train_batches) == 0:
        raise QuantizationError("Quantization-aware training was given no training images.")
    prepared = _prepare(model, _example(model), qat=True, weights=weights)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9)
    total = epochs * len(train_batches)
    step = 0
    with _x86_engine():
        prepared.train()
        for _ in range(epochs):
            for images, labels in train_batches:
                if step == int(freeze_observers_after * total):
                    prepared.apply(disable_observer)
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(prepared(images.float()), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if on_step is not None:
                    on_step(loss.item())
    return _convert(prepared, model, "qat", weights)


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


def save_quantized(model: QuantizedRepVGG, path: PathLike) -> Path:
    """Write an INT8 RepVGG in this package's safetensors format (atomically)."""
    tensors, layout = _flatten_state(model.network.state_dict())
    metadata = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "engine": ENGINE,
        "method": model.method,
        "weights": model.weights,
        "config": json.dumps(model.config),
        "model_name": model.model_name or "",
        "class_names": json.dumps(model.class_names) if model.class_names is not None else "",
        "preprocessing": json.dumps(model.preprocessing or {}),
        "layout": json.dumps(layout),
    }
    path = Path(path)
    atomic_write(path, lambda target: save_file(tensors, str(target), metadata=metadata), what="the model")
    return path


def load_quantized(tensors: dict[str, Tensor], metadata: dict[str, str]) -> QuantizedRepVGG:
    """Rebuild an INT8 RepVGG from what :func:`save_quantized` wrote (see ``repvgg.load_checkpoint``)."""
    config = json.loads(metadata["config"])
    template = RepVGG(**config, deploy=True)
    weights = metadata.get("weights", "per-channel")
    prepared = _prepare(template, _example(template), qat=False, weights=weights)
    model = _convert(prepared, template, metadata.get("method", "ptq"), weights)
    state = _unflatten_state(tensors, json.loads(metadata["layout"]))
    expected = model.network.state_dict()
    missing = [k for k in expected if k not in state and isinstance(expected[k], Tensor | tuple)]
    if missing or set(state) - set(expected):
        raise QuantizationError(
            "This INT8 checkpoint does not match the architecture it records; save it again with repvgg "
            "quantize."
        )
    expected.update(state)  # in place: the state dict's _metadata holds the layers' format versions
    with _x86_engine():
        model.network.load_state_dict(expected, strict=True)
    model.model_name = metadata.get("model_name") or None
    model.class_names = json.loads(metadata["class_names"]) if metadata.get("class_names") else None
    model.preprocessing = json.loads(metadata.get("preprocessing") or "{}") or None
    return model.eval()


def quantize_checkpoint(
    checkpoint: PathLike,
    output: PathLike,
    *,
    data: str = "fashion-mnist",
    data_dir: str | None = None,
    calib: int = 512,
    qat_epochs: int = 0,
    qat_lr: float = 1e-3,
    qat_subset: int | None = None,
    batch_size: int = 64,
    weights: str = "per-channel",
    seed: int = 0,
    progress: bool = True,
) -> tuple[QuantizedRepVGG, list[str]]:
    """Quantize a float checkpoint to INT8 and save it: PTQ on ``calib`` training images, or QAT.

    Returns the model and notes for the user (e.g. that a training-form checkpoint was converted).
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from repvgg.checkpoints import load_checkpoint
    from repvgg.data import build_data, calibration_images
    from repvgg.deploy import writable_or_raise
    from repvgg.reparam import is_deployed

    writable_or_raise(output)
    if calib < 1:
        raise QuantizationError(
            f"--calib {calib} gives no calibration images; pass N >= 1 (a few hundred is typical)."
        )
    model = load_checkpoint(checkpoint)
    if isinstance(model, QuantizedRepVGG):
        raise QuantizationError(f"{checkpoint} is already INT8; quantize the float checkpoint instead.")
    notes = []
    if not is_deployed(model):
        notes.append(f"{checkpoint} is in training form; it was converted to its deploy form first")
    bundle = build_data(data, data_dir, train_subset=qat_subset, seed=seed)
    if bundle.in_chans != model.in_chans or bundle.num_classes != model.num_classes:
        raise QuantizationError(
            f"The model takes {model.in_chans}-channel images and has {model.num_classes} classes but {data} "
            f"has {bundle.in_chans} and {bundle.num_classes}: quantize with the dataset it was trained on."
        )

    def batches(dataset: Any, shuffle: bool) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset, batch_size, shuffle=shuffle, generator=generator, collate_fn=_refuse_bad_images
        )

    if qat_epochs > 0:
        loader = batches(bundle.train, shuffle=True)
        bar = tqdm(total=qat_epochs * len(loader), desc="QAT", unit="batch", disable=not progress)

        def step(loss: float) -> None:
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")

        torch.manual_seed(seed)
        quantized = quantize_qat(model, loader, epochs=qat_epochs, lr=qat_lr, weights=weights, on_step=step)
        bar.close()
    else:
        calibration = calibration_images(bundle, calib, seed)
        quantized = quantize_ptq(
            model, (images for images, _ in batches(calibration, shuffle=False)), weights=weights
        )
    save_quantized(quantized, output)
    return quantized, notes


def _refuse_bad_images(batch: list[Any]) -> tuple[Tensor, Tensor]:
    from repvgg.data import collate_reporting_bad

    images, labels, bad = collate_reporting_bad(batch)
    if bad:
        raise bad[0].error("fix or remove it")
    return images, labels
