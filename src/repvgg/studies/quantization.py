"""The INT8 workflow: quantize a float checkpoint for the CPU, by calibration (PTQ) or by quantization-aware
fine-tuning (QAT), and save it.

The INT8 graph itself is built in :mod:`repvgg.core.int8`; its file format lives in
:mod:`repvgg.io.checkpoints`.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

from repvgg.core.info import model_info
from repvgg.core.int8 import (
    QuantizedRepVGG,
    convert_int8,
    example_input,
    prepare_int8,
    quantize_ptq,
    x86_engine,
)
from repvgg.core.models import RepVGG
from repvgg.core.reparam import is_deployed, refuse_nonfinite
from repvgg.engine.data import build_data, calibration_images, collate_refusing_bad
from repvgg.engine.recipe import LRSchedule
from repvgg.engine.training import Task, Trainer
from repvgg.exceptions import QuantizationError
from repvgg.io.checkpoints import file_kind, load_checkpoint, require_kind, save_quantized
from repvgg.io.files import PathLike, refuse_same_file, writable_or_raise
from repvgg.io.machine import int8_activation_bits

#: Training batches whose conv outputs set the re-inserted BatchNorms' statistics (a few hundred images).
BATCHNORM_BATCHES = 8


def quantize_qat(
    model: RepVGG,
    train_batches: Collection[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    lr: float = 1e-3,
    batchnorm: bool = True,
    freeze_batchnorm_after: float = 0.4,
    freeze_observers_after: float = 0.5,
    weights: str = "per-channel",
    activation_bits: int = 7,
    seed: int = 0,
    progress: bool = False,
    log_interval: int = 0,
) -> QuantizedRepVGG:
    """Quantization-aware fine-tuning of the deployed network, then conversion to INT8.

    Fake quantization in the forward pass lets the weights adapt to the int8 grid. With ``batchnorm`` (the
    default) it is the standard conv + BN recipe: a BatchNorm, measured on the first
    :data:`BATCHNORM_BATCHES` of ``train_batches`` so that the network starts as the plain one, is put back
    after every conv (:func:`repvgg.core.int8.with_batchnorm`); training normalises with batch statistics
    until ``freeze_batchnorm_after`` of the steps, then with the running ones (the weights the INT8 model
    folds), and the conversion folds each BatchNorm into its conv. Without ``batchnorm`` the plain convs
    are fine-tuned as they are.

    It runs through the one :class:`~repvgg.engine.training.Trainer`: SGD (momentum 0.9), ``lr``
    cosine-annealed to 0 over ``epochs`` passes over ``train_batches`` (a DataLoader or a list); the
    observers stop moving after ``freeze_observers_after`` of the steps so the last steps train against
    fixed scales. ``activation_bits`` as for post-training quantization
    (:data:`repvgg.core.int8.ACTIVATION_BITS`).
    """
    if epochs < 1:
        raise QuantizationError("Quantization-aware training needs `epochs` of at least 1.")
    if len(train_batches) == 0:
        raise QuantizationError("Quantization-aware training was given no training images.")
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import disable_observer

    statistics = itertools.islice((batch[0] for batch in train_batches), BATCHNORM_BATCHES)
    prepared = prepare_int8(
        model,
        example_input(model),
        qat=True,
        weights=weights,
        activation_bits=activation_bits,
        batchnorm_images=statistics if batchnorm else None,
    )
    total = epochs * len(train_batches)
    # each freeze comes after at least one step, so the observers and BatchNorms see a batch first
    freezes = [
        (max(1, int(freeze_batchnorm_after * total)), freeze_bn_stats),
        (max(1, int(freeze_observers_after * total)), disable_observer),
    ]

    def freeze(step: int) -> None:
        for at, what in freezes:
            if step == at:
                prepared.apply(what)

    trainer = Trainer(
        prepared,
        train_batches,  # type: ignore[arg-type]
        Task(),
        torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9),
        LRSchedule(total),
        epochs=epochs,
        on_step=freeze,
        seed=seed,
        progress=progress,
        log_interval=log_interval,
    )
    with x86_engine():
        trainer.fit()
    return convert_int8(prepared, model_info(model), "qat", weights, activation_bits)


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
    image_size: int | None = None,
    device: str | None = None,
    workers: int = 0,
    progress: bool = True,
    log_interval: int = 50,
) -> tuple[QuantizedRepVGG, list[str]]:
    """Quantize a float checkpoint to INT8 and save it: PTQ on ``calib`` training images, or QAT.

    Images are prepared at ``image_size`` (default: the size the checkpoint was trained at) and read by
    ``workers`` processes. INT8 kernels are x86 CPU kernels, so ``device`` may only be the CPU.
    Returns the model and notes for the user (e.g. that a training-form checkpoint was converted).
    """
    from torch.utils.data import DataLoader

    if device is not None and device != "cpu":
        raise QuantizationError(
            f"`device` {device}: INT8 quantization and its kernels run on the CPU (x86 engine); give cpu."
        )
    writable_or_raise(output, QuantizationError)
    refuse_same_file(checkpoint, output, QuantizationError)
    if calib < 1:
        raise QuantizationError(
            f"`calib` {calib} gives no calibration images; give N >= 1 (a few hundred is typical)."
        )
    for name, value, lowest in (("qat_epochs", qat_epochs, 0), ("batch_size", batch_size, 1)):
        if value < lowest:
            raise QuantizationError(f"`{name}` must be at least {lowest}, got {value}.")
    if not qat_lr > 0 or (qat_subset is not None and qat_subset < 1):
        raise QuantizationError(
            f"`qat_lr` must be above 0 and `qat_subset` at least 1, got {qat_lr}, {qat_subset}."
        )
    if file_kind(checkpoint) == "int8":
        raise QuantizationError(f"{checkpoint} is already INT8; quantize the float checkpoint instead.")
    require_kind(checkpoint, ("classifier",), "INT8 quantization", QuantizationError)
    model = load_checkpoint(checkpoint)
    refuse_nonfinite(model, str(checkpoint), QuantizationError)
    notes = []
    if not is_deployed(model):
        notes.append(f"{checkpoint} is in training form; it was converted to its deploy form first")
    recorded = model.info.preprocessing.image_size if model.info.preprocessing else None
    size = image_size or (recorded if data == "imagefolder" else None)  # small sets: one native size
    bundle = build_data(data, data_dir, image_size=size, train_subset=qat_subset, seed=seed)
    if bundle.in_chans != model.in_chans or bundle.num_classes != model.num_classes:
        raise QuantizationError(
            f"The model takes {model.in_chans}-channel images and has {model.num_classes} classes but {data} "
            f"has {bundle.in_chans} and {bundle.num_classes}: quantize with the dataset it was trained on."
        )

    def batches(dataset: Any, shuffle: bool) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate_refusing_bad,
            num_workers=workers,
        )

    if qat_epochs > 0:
        torch.manual_seed(seed)
        loader = batches(bundle.train, shuffle=True)
        quantized = quantize_qat(
            model,
            loader,
            epochs=qat_epochs,
            lr=qat_lr,
            weights=weights,
            activation_bits=int8_activation_bits(),
            seed=seed,
            progress=progress,
            log_interval=log_interval,
        )
    else:
        calibration = calibration_images(bundle, calib, seed)
        quantized = quantize_ptq(
            model,
            (images for images, _ in batches(calibration, shuffle=False)),
            weights=weights,
            activation_bits=int8_activation_bits(),
        )
    save_quantized(quantized, output)
    return quantized, notes
