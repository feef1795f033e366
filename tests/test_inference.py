"""Backends (``optimize``), prediction on image files, and evaluation through a backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import repvgg
from repvgg.cli import main
from repvgg.engine.data import build_data, write_sample_images
from repvgg.engine.evaluation import evaluate_checkpoint
from repvgg.exceptions import DataError, InferenceError
from repvgg.runtime.names import BACKENDS
from repvgg.runtime.optimize import optimize
from repvgg.runtime.predict import predict
from tests.helpers import relative_error, small_model
from tests.test_data import fake_fashion_mnist


@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=pytest.mark.slow) if b == "inductor" else b for b in BACKENDS]
)
def test_every_backend_matches_the_training_form(backend: str) -> None:
    model = small_model()
    inputs = torch.randn(4, 1, 28, 28)
    optimized = optimize(model, backend, example_input=inputs)
    assert optimized.backend == backend and optimized.max_rel_error <= 1e-4
    assert not model.training and not repvgg.is_deployed(model)  # the model given is left alone
    other = torch.randn(3, 1, 28, 28)  # another batch size than the example's
    with torch.no_grad():
        assert relative_error(optimized(other), model(other)) < 1e-4
    assert optimized.info == model.info and optimized.info.in_chans == 1


@pytest.mark.slow
def test_auto_times_every_backend_and_keeps_the_fastest() -> None:
    inputs = torch.randn(4, 1, 28, 28)
    optimized = optimize(small_model(), "auto", example_input=inputs, repeats=2)
    assert set(optimized.timings) | set(optimized.skipped) == set(BACKENDS)
    assert optimized.backend == min(optimized.timings, key=optimized.timings.__getitem__)


def test_a_failing_backend_is_skipped_by_auto_and_named_when_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("no C++ compiler found\nmore details")

    monkeypatch.setitem(repvgg.runtime.optimize._BUILDERS, "inductor", broken)
    monkeypatch.setitem(
        repvgg.runtime.optimize._BUILDERS, "onnxruntime", lambda m, s, e: lambda x: torch.zeros(len(x), 10)
    )
    inputs = torch.randn(2, 1, 28, 28)
    optimized = optimize(small_model(), "auto", example_input=inputs)
    assert optimized.backend == "eager" and optimized.timings == {}
    assert optimized.skipped["inductor"] == "RuntimeError: no C++ compiler found"
    assert "outputs differ from eager PyTorch" in optimized.skipped["onnxruntime"]
    with pytest.raises(InferenceError, match=r"No backend could run this model here .*no C\+\+ compiler"):
        optimize(small_model(), "inductor", example_input=inputs)


def test_optimize_refuses_bad_requests() -> None:
    inputs = torch.randn(2, 1, 28, 28)
    with pytest.raises(InferenceError, match="Unknown backend 'tensorrt': choose one of auto, eager"):
        optimize(small_model(), "tensorrt", example_input=inputs)
    with pytest.raises(InferenceError, match="float16 inference is for CUDA"):
        optimize(small_model(), "eager", example_input=inputs, dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(dtype: torch.dtype) -> None:
    model = small_model()
    inputs = torch.randn(8, 1, 28, 28, device="cuda")
    optimized = optimize(model, "auto", example_input=inputs, dtype=dtype)
    assert torch.backends.cudnn.benchmark and "onnxruntime" in optimized.skipped
    with torch.no_grad():
        assert relative_error(optimized(inputs).cpu(), model(inputs.cpu())) < 2e-2


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    bundle = build_data("fashion-mnist", fake_fashion_mnist(tmp_path / "fm", train=8, test=5))
    return write_sample_images(bundle, tmp_path / "images", 5)


def test_predict_names_classes_and_reports_unreadable_images(images: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    model = small_model()
    checkpoint = repvgg.save_checkpoint(model, tmp_path / "m.safetensors")
    predictions, bad = predict(checkpoint, [images[0], broken, *images[1:]], topk=3, batch_size=2)
    assert [p.path for p in predictions] == [str(p) for p in images]
    assert [b.path for b in bad] == [str(broken)]
    for prediction in predictions:
        labels = [label for label, _ in prediction.top]
        probabilities = [p for _, p in prediction.top]
        assert len(labels) == 3 and all(label.startswith("class ") for label in labels)
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    # The same image through the model by hand: the saved preprocessing is Fashion-MNIST's.
    from PIL import Image

    pixels = torch.from_numpy(np.asarray(Image.open(images[0]), dtype=np.float32) / 255)
    with torch.no_grad():
        expected = model(((pixels - 0.2860) / 0.3530)[None, None]).softmax(1)[0]
    label, probability = predictions[0].top[0]
    assert label == f"class {int(expected.argmax())}" and abs(probability - float(expected.max())) < 1e-5


def test_predict_command(images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    assert main(["predict", str(checkpoint), *map(str, images[:2]), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{images[0]}: class ") and lines[0].count("%") == 2
    assert main(["predict", str(checkpoint), str(images[0]), str(tmp_path / "missing.png")]) == 1
    captured = capsys.readouterr()
    assert "missing.png" in captured.err and "it was skipped" in captured.err
    assert captured.out.startswith(str(images[0]))


def test_predict_needs_a_matching_preprocessing(images: list[Path]) -> None:
    model = small_model()
    model.preprocessing = None  # as in the authors' or timm's files: nothing recorded
    with pytest.raises(DataError, match=r"1-channel images but the preprocessing assumed .* has 3"):
        predict(model, images)
    predictions, _ = predict(model, images, preprocessing="fashion-mnist")
    assert len(predictions) == len(images)
    with pytest.raises(DataError, match="Unknown preprocessing 'mnist'"):
        predict(model, images, preprocessing="mnist")


def test_eval_through_a_backend_agrees_with_eager(tmp_path: Path) -> None:
    data_dir = fake_fashion_mnist(tmp_path / "fm", train=8, test=40)
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    eager = evaluate_checkpoint(checkpoint, data_dir=str(data_dir), batch_size=16, workers=0)
    fast = evaluate_checkpoint(
        checkpoint, data_dir=str(data_dir), batch_size=16, workers=0, backend="onnxruntime"
    )
    assert fast.images == eager.images == 40
    assert fast.top1 == eager.top1 and abs(fast.loss - eager.loss) < 1e-4
