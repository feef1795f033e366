"""Whatever the package writes, it reads back: every writer, with every argument it accepts, gives a file
that ``load_checkpoint`` turns into the same network (same outputs, same record). ``save_checkpoint`` once
wrote files its own loader refused (class names that were numbers, an ``.onnx`` path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import repvgg
from repvgg.core.int8 import quantize_ptq
from repvgg.io.checkpoints import save_quantized
from repvgg.studies.ablation import ResidualReorg
from tests.helpers import relative_error, small_model

INPUT = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _pspnet() -> repvgg.PSPNet:
    network = repvgg.pspnet("repvgg_a0", 3, in_chans=1, head_channels=8, aux_weight=0)
    network.class_names = ["background", "shoe", "bag"]
    return repvgg.randomize_batchnorm_(network, seed=3).eval()


class _Detector(nn.Module):
    """A network with RepVGG blocks inside: read back into a model built by its owner."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = repvgg.create_model("repvgg_a0", features_only=True, in_chans=1, out_indices=(4,))
        self.head = nn.Conv2d(1280, 4, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)[0])


WRITTEN: dict[
    str, tuple[Callable[[], nn.Module], Callable[[nn.Module, Path], Path], Callable[[], nn.Module] | None]
] = {
    # name: (the network, how it is written, the model to read it into, None: the file rebuilds it)
    "train-form": (small_model, lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors"), None),
    "deploy-form": (
        lambda: repvgg.reparameterize(small_model()),
        lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors"),
        None,
    ),
    "class-names": (
        small_model,
        lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors", class_names=[f"c{i}" for i in range(10)]),
        None,
    ),
    "a-pth-name": (small_model, lambda m, p: repvgg.save_checkpoint(m, p / "RepVGG-train.pth"), None),
    "bfloat16": (
        lambda: small_model().to(torch.bfloat16),
        lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors"),
        None,
    ),
    "backbone": (
        lambda: repvgg.create_model("repvgg_a0", features_only=True, in_chans=1).eval(),
        lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors"),
        lambda: repvgg.create_model("repvgg_a0", features_only=True, in_chans=1),
    ),
    "pspnet": (_pspnet, lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors"), None),
    "pspnet-deploy": (
        lambda: repvgg.reparameterize(_pspnet()),
        lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors"),
        None,
    ),
    "residual-baseline": (
        lambda: ResidualReorg("repvgg_a0", 10, in_chans=1).eval(),
        lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors"),
        lambda: ResidualReorg("repvgg_a0", 10, in_chans=1),
    ),
    "network-with-repvgg-inside": (
        lambda: _Detector().eval(),
        lambda m, p: repvgg.save_checkpoint(m, p / "m.safetensors"),
        _Detector,
    ),
    "repvgg_model_convert": (
        small_model,
        lambda m, p: (repvgg.repvgg_model_convert(m, str(p / "d.pth")), p / "d.pth")[1],
        None,
    ),
    "convert-repvgg": (
        small_model,
        lambda m, p: (
            repvgg.convert_checkpoint(
                repvgg.save_checkpoint(m, p / "t.safetensors"), p / "d.safetensors"
            ).path
        ),
        None,
    ),
    "convert-official": (
        lambda: repvgg.create_model("repvgg_a0", num_classes=10).eval(),
        lambda m, p: (
            repvgg.convert_checkpoint(
                repvgg.save_checkpoint(m, p / "t.safetensors"), p / "d.pth", to="official"
            ).path
        ),
        None,
    ),
    "convert-timm": (
        lambda: repvgg.create_model("repvgg_a0", num_classes=10).eval(),
        lambda m, p: (
            repvgg.convert_checkpoint(
                repvgg.save_checkpoint(m, p / "t.safetensors"), p / "d.safetensors", to="timm"
            ).path
        ),
        None,
    ),
    "onnx": (
        small_model,
        lambda m, p: (repvgg.export_model(m, p / "m.onnx", to="onnx"), p / "m.onnx")[1],
        None,
    ),
    "int8": (
        lambda: quantize_ptq(small_model(), [INPUT]),
        lambda m, p: save_quantized(m, p / "q.safetensors"),  # type: ignore[arg-type]
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_what_the_package_writes_it_reads_back(name: str, tmp_path: Path) -> None:
    make, write, reader = WRITTEN[name]
    torch.manual_seed(0)
    model = make()
    path = write(model, tmp_path)
    loaded = repvgg.load_checkpoint(path, model=reader() if reader else None).eval()
    images = INPUT if name not in ("convert-official", "convert-timm") else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(images.to(next(model.parameters(), images).dtype)), loaded(images)
    expected, got = (t[0] if isinstance(t, list) else t for t in (expected, got))
    bound = {"bfloat16": 1e-2, "onnx": 1e-4, "int8": 0.0}.get(name, 1e-5)
    assert relative_error(got.float(), expected.float()) <= bound, name
    original, read = repvgg.model_info(model), repvgg.model_info(loaded)
    if name == "class-names":  # the names given to save_checkpoint, not the model's own
        assert read.class_names == tuple(f"c{i}" for i in range(10))
    elif original.class_names is not None and name not in ("convert-official", "convert-timm"):
        assert read.class_names == original.class_names


def test_every_writer_is_in_the_table() -> None:
    """The writers of the public API, each exercised above."""
    writers = {
        "save_checkpoint",
        "repvgg_model_convert",
        "convert_checkpoint",
        "export_model",
        "save_quantized",
    }
    covered = " ".join(f"{name} {WRITTEN[name][1].__code__.co_names}" for name in WRITTEN)
    assert all(writer in covered for writer in writers)
