"""INT8: the plain layout, PTQ and QAT, the saved format, and INT8 models in eval, predict and bench."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import repvgg
from repvgg.cli import main
from repvgg.core.int8 import (
    QuantizedRepVGG,
    example_input,
    plain_network,
    prepare_int8,
    quantize_ptq,
    with_batchnorm,
)
from repvgg.engine.data import build_data, calibration_images, write_sample_images
from repvgg.engine.evaluation import evaluate_checkpoint
from repvgg.exceptions import CheckpointError, InferenceError, QuantizationError
from repvgg.io.checkpoints import read_checkpoint, save_quantized
from repvgg.runtime.optimize import optimize
from repvgg.runtime.predict import predict
from repvgg.studies.bench import Protocol as BenchProtocol
from repvgg.studies.bench import candidates, run_bench
from repvgg.studies.quantization import quantize_qat
from tests.helpers import relative_error, small_model
from tests.test_data import fake_fashion_mnist


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=96, test=48)


def calibration(batches: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 28, 28, generator=generator) for _ in range(batches)]


def test_plain_network_is_the_deployed_model_as_a_stack() -> None:
    deployed = repvgg.reparameterize(small_model())
    plain = plain_network(deployed)
    kinds = [type(layer).__name__ for layer in plain]
    assert kinds[:4] == ["Conv2d", "ReLU", "Conv2d", "ReLU"] and kinds[-3:] == [
        "AdaptiveAvgPool2d",
        "Flatten",
        "Linear",
    ]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), deployed(x))


def test_plain_network_refuses_what_it_cannot_lay_out() -> None:
    with pytest.raises(QuantizationError, match="training form: convert it first"):
        plain_network(small_model())
    with pytest.raises(QuantizationError, match="without squeeze-and-excitation"):
        plain_network(repvgg.RepVGG([1, 1, 1, 1], 10, [0.25, 0.25, 0.25, 0.5], deploy=True, use_se=True))
    with pytest.raises(QuantizationError, match="not a Linear"):
        plain_network(torch.nn.Linear(2, 2))


def test_ptq_is_close_to_float_and_leaves_the_model_alone() -> None:
    model = small_model()
    quantized = quantize_ptq(model, calibration())
    assert isinstance(quantized, QuantizedRepVGG) and quantized.method == "ptq"
    assert not repvgg.is_deployed(model), "the float model given is not converted in place"
    x = calibration(1, seed=1)[0]
    with torch.no_grad():
        expected = model(x)
    # int8 activations and per-channel int8 weights: about 1% of the logits' range here
    assert relative_error(quantized(x), expected) < 0.08
    assert list(quantized.info.class_names) == model.class_names and quantized.in_chans == 1
    fused = [m for m in quantized.network.modules() if type(m).__name__ == "ConvReLU2d"]
    assert len(fused) == 6, "every conv + ReLU pair runs as one fused int8 kernel"


def test_no_calibration_images_is_one_sentence() -> None:
    with pytest.raises(QuantizationError, match="No calibration images"):
        quantize_ptq(small_model(), [])
    with pytest.raises(QuantizationError, match="`weights` must be one of per-channel, per-tensor"):
        quantize_ptq(small_model(), calibration(1), weights="per-row")


@pytest.mark.parametrize("weights", ["per-channel", "per-tensor"])
def test_int8_checkpoint_round_trips_exactly(tmp_path: Path, weights: str) -> None:
    quantized = quantize_ptq(small_model(), calibration(), weights=weights)
    conv = next(m for m in quantized.network.modules() if type(m).__name__ == "ConvReLU2d")
    per_channel = conv.weight().qscheme() == torch.per_channel_affine
    assert per_channel == (weights == "per-channel")
    path = save_quantized(quantized, tmp_path / "int8.safetensors")
    loaded = repvgg.load_checkpoint(path)
    assert isinstance(loaded, QuantizedRepVGG) and loaded.weights == weights
    x = calibration(1, seed=2)[0]
    assert torch.equal(loaded(x), quantized(x))
    assert loaded.info == quantized.info and loaded.info.precision == "int8"
    with pytest.raises(CheckpointError, match=r"INT8 .* needs the float checkpoint"):
        read_checkpoint(path)


def test_batchnorm_put_back_after_every_conv_leaves_the_function_as_it_was() -> None:
    plain = plain_network(repvgg.reparameterize(small_model()))
    images = calibration(2)
    with_bn = with_batchnorm(plain, images)
    names = [name for name, _ in with_bn.named_children()]
    convs = [name for name, layer in plain.named_children() if isinstance(layer, torch.nn.Conv2d)]
    assert [name for name in names if not name.endswith("_bn")] == [
        name for name, _ in plain.named_children()
    ]
    assert [names[names.index(conv) + 1] for conv in convs] == [f"{conv}_bn" for conv in convs]
    x = calibration(1, seed=3)[0]
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(with_bn.eval()(x), expected)
        # measured statistics, not unit ones: on the batch they were measured on, batch statistics give the
        # plain network's function in training mode too
        one_batch = with_batchnorm(plain, [x]).train()
        torch.testing.assert_close(one_batch(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(QuantizationError, match="No images were given to measure the BatchNorm statistics"):
        with_batchnorm(plain, [])


def test_qat_graph_fuses_each_conv_with_its_batchnorm_and_relu() -> None:
    model = small_model()
    prepared = prepare_int8(
        model, example_input(model), qat=True, weights="per-channel", batchnorm_images=calibration()
    )
    kinds = [type(module).__name__ for module in prepared.modules()]
    assert kinds.count("ConvBnReLU2d") == 6 and "BatchNorm2d" in kinds, "one fused QAT module per conv"
    fused = next(m for m in prepared.modules() if type(m).__name__ == "ConvBnReLU2d")
    assert fused.weight_fake_quant is not None and fused.bn.training, "BN statistics move until frozen"
    without = prepare_int8(model, example_input(model), qat=True, weights="per-channel")
    assert "ConvBnReLU2d" not in [type(module).__name__ for module in without.modules()]
    with pytest.raises(QuantizationError, match="BatchNorm is put back for quantization-aware training only"):
        prepare_int8(model, example_input(model), qat=False, weights="per-channel", batchnorm_images=[])


def test_qat_fine_tunes_with_fake_quantization_then_converts(tmp_path: Path) -> None:
    model = small_model()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=generator), torch.randint(0, 10, (8,))) for _ in range(3)]
    quantized = quantize_qat(model, batches, epochs=2, lr=1e-2, activation_bits=8)
    assert quantized.method == "qat" and torch.isfinite(quantized(batches[0][0])).all()
    unchanged = quantize_qat(model, batches, epochs=2, lr=0.0)  # observers only: the weights stay
    assert not torch.equal(quantized(batches[0][0]), unchanged(batches[0][0])), "QAT trains the weights"
    fused = [m for m in quantized.network.modules() if type(m).__name__ == "ConvReLU2d"]
    assert len(fused) == 6 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in quantized.modules())
    path = save_quantized(quantized, tmp_path / "qat.safetensors")
    loaded = repvgg.load_checkpoint(path)
    assert isinstance(loaded, QuantizedRepVGG) and (loaded.method, loaded.activation_bits) == ("qat", 8)
    assert torch.equal(loaded(batches[0][0]), quantized(batches[0][0]))
    with pytest.raises(QuantizationError, match="at least 1"):
        quantize_qat(model, batches, epochs=0)
    one_step = quantize_qat(model, batches[:1], epochs=1)  # the observers still see a batch before freezing
    assert torch.isfinite(one_step(batches[0][0])).all()


Batch = tuple[torch.Tensor, torch.Tensor]


def badly_scaled_task() -> tuple[repvgg.RepVGG, list[Batch], Batch]:
    """A small deployed model trained on noisy class templates, then with the first channel of every conv
    scaled up 30x and the next layer's weights on it scaled down as much: the same function (ReLU is
    positively homogeneous), but one scale per weight tensor now fits that channel and rounds the others
    away. Returns the model, training batches and test images with their labels (16 x 16 images)."""
    size = 16
    generator = torch.Generator().manual_seed(2)
    templates = torch.nn.functional.interpolate(
        torch.randn(10, 1, 4, 4, generator=generator), size=size, mode="bilinear"
    )

    def images(count: int) -> Batch:
        labels = torch.randint(0, 10, (count,), generator=generator)
        return templates[labels] + 3 * torch.randn(count, 1, size, size, generator=generator), labels

    train, test = images(512), images(512)
    batches = [(train[0][i : i + 32], train[1][i : i + 32]) for i in range(0, 512, 32)]
    model = small_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(100):
        inputs, labels = batches[step % len(batches)]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    deployed = repvgg.reparameterize(model.eval())
    convs = [layer for layer in plain_network(deployed) if isinstance(layer, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv, following in zip(convs, [*convs[1:], deployed.linear], strict=True):
            conv.weight[0] *= 30
            conv.bias[0] *= 30
            following.weight[:, 0] /= 30
    return deployed, batches, test


@pytest.mark.slow
def test_qat_with_batchnorm_wins_back_what_per_tensor_ptq_loses() -> None:
    model, batches, (images, labels) = badly_scaled_task()

    def top1(network: torch.nn.Module) -> float:
        with torch.no_grad():
            return (network(images).argmax(1) == labels).float().mean().item()

    ptq = top1(quantize_ptq(model, [inputs for inputs, _ in batches[:4]], weights="per-tensor"))
    qat = top1(quantize_qat(model, batches, epochs=3, lr=1e-3, weights="per-tensor"))
    assert ptq < top1(model) - 0.1, "the fixture hurts post-training quantization"
    # measured here (2 threads): float 0.80, PTQ 0.64, QAT 0.71; QAT of the plain convs (batchnorm=False) 0.60
    assert qat >= ptq


def test_calibration_images_are_training_images_prepared_for_evaluation(fashion: Path) -> None:
    bundle = build_data("fashion-mnist", fashion)
    images = calibration_images(bundle, 10)
    first, _ = images[0]
    assert len(images) == 10 and first.shape == (1, 28, 28)
    again, _ = images[0]
    assert torch.equal(first, again), "no random augmentation in calibration"


@pytest.mark.slow
def test_quantize_command_then_eval_predict_and_bench(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_form = repvgg.save_checkpoint(small_model(), tmp_path / "train.safetensors")
    int8 = tmp_path / "int8.safetensors"
    arguments = ["quantize", str(train_form), str(int8), "--data-dir", str(fashion), "--calib", "32"]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "is in training form; it was converted" in out and "wrote the INT8 model" in out
    result = evaluate_checkpoint(int8, data_dir=str(fashion))
    float_result = evaluate_checkpoint(train_form, data_dir=str(fashion))
    assert result.images == float_result.images == 48
    assert abs(result.top1 - float_result.top1) <= 100 * 8 / 48, "at most a few images change class"
    images = write_sample_images(build_data("fashion-mnist", fashion), tmp_path / "images", 3)
    predictions, bad = predict(int8, images, topk=2)
    assert len(predictions) == 3 and not bad and predictions[0].top[0][0].startswith("class")
    bench = run_bench(
        candidates([], baselines=[], timm_peers=False, checkpoints=[str(int8)]),
        BenchProtocol("cpu", batch_size=2, image_size=28, warmup=0, batches=1, rounds=1),
        measure_memory=True,
        progress=False,
    )
    row = bench.rows[0]
    assert row.label == "int8.safetensors" and row.gmacs > 0 and row.examples_per_s > 0
    assert row.peak_memory_mib is not None


def test_quantize_command_errors_are_one_sentence(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy = repvgg.save_checkpoint(repvgg.reparameterize(small_model()), tmp_path / "deploy.safetensors")
    assert main(["quantize", str(deploy), str(tmp_path / "q.safetensors"), "--calib", "0"]) == 2
    assert "--calib 0 gives no calibration images" in capsys.readouterr().err
    rgb = repvgg.save_checkpoint(repvgg.create_model("a0", num_classes=10, deploy=True), tmp_path / "a0.st")
    assert main(["quantize", str(rgb), str(tmp_path / "q.safetensors"), "--data-dir", str(fashion)]) == 2
    assert "quantize with the dataset it was trained on" in capsys.readouterr().err


def test_int8_runs_only_on_the_cpu_engine() -> None:
    quantized = quantize_ptq(small_model(), calibration())
    x = torch.randn(2, 1, 28, 28)
    runner = optimize(quantized, "auto", example_input=x)
    assert runner.backend == "int8-x86" and torch.equal(runner(x), quantized(x))
    with pytest.raises(InferenceError, match="An INT8 model runs one way, on the CPU"):
        optimize(quantized, "onnxruntime", example_input=x)


def test_int8_uses_the_full_activation_range_where_vnni_makes_it_safe_and_records_it(tmp_path: Path) -> None:
    from repvgg.core.int8 import quantize_ptq
    from repvgg.io.checkpoints import save_quantized
    from repvgg.io.machine import cpu_features

    model = small_model(in_chans=1, num_classes=4).eval()
    calibration = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    seven = quantize_ptq(model, calibration)
    eight = quantize_ptq(model, calibration, activation_bits=8)
    assert (seven.activation_bits, eight.activation_bits) == (7, 8)
    first = next(m for m in eight.network.modules() if hasattr(m, "scale") and hasattr(m, "zero_point"))
    first_seven = next(m for m in seven.network.modules() if hasattr(m, "scale") and hasattr(m, "zero_point"))
    assert float(first.scale) < float(first_seven.scale), "twice the levels over the same range"
    path = save_quantized(eight, tmp_path / "eight.safetensors")
    if cpu_features()["fast_int8"]:
        assert repvgg.load_checkpoint(path).activation_bits == 8
    else:
        with pytest.warns(repvgg.RepVGGWarning, match="made for CPUs with VNNI"):
            assert repvgg.load_checkpoint(path).activation_bits == 8
    with pytest.raises(repvgg.exceptions.QuantizationError, match="`activation_bits` must be 7 or 8"):
        quantize_ptq(model, calibration, activation_bits=6)
