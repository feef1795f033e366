"""Nothing lost, nothing silently wrong: run folders, resuming, diverged runs, strict JSON, checked values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import repvgg
from repvgg.cli import main
from repvgg.engine.config import TrainConfig, load_run_config
from repvgg.engine.evaluation import EvalResult, evaluate_checkpoint
from repvgg.engine.training import train
from repvgg.exceptions import InferenceError, ModelConfigError, TrainingError
from repvgg.io.jsonfile import json_text
from repvgg.studies.ablation import AblationConfig, run_ablation
from tests.helpers import small_model, with_nan_in
from tests.test_data import fake_fashion_mnist, make_image_folder

SMALL = {"batch_size": 32, "progress": False, "epochs": 1}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=128, test=64)


def config(data_dir: Path, output: Path, **overrides: object) -> TrainConfig:
    return TrainConfig.from_dict({**SMALL, "data_dir": str(data_dir), "output": str(output), **overrides})


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": 0}, "`epochs` must be at least 1"),
        ({"epochs": 2.5}, "`epochs` must be of type int"),
        ({"epochs": True}, "`epochs` must be of type int"),
        ({"batch_size": -4}, "`batch_size` must be at least 1"),
        ({"batch_size": "64"}, "`batch_size` must be of type int"),
        ({"lr": 0.0}, "`lr` must be above 0"),
        ({"lr": -0.1}, "`lr` must be above 0"),
        ({"lr": "high"}, "`lr` must be of type float"),
        ({"momentum": 1.5}, "`momentum` must be at least 0 and at most 1"),
        ({"weight_decay": -1e-4}, "`weight_decay` must be at least 0"),
        ({"warmup_epochs": -1.0}, "`warmup_epochs` must be at least 0"),
        ({"label_smoothing": float("nan")}, "`label_smoothing` must be at least 0 and at most 1"),
        ({"mixup": -0.2}, "`mixup` must be at least 0"),
        ({"ema_decay": 0.0}, "`ema_decay` must be above 0"),
        ({"ema_decay": 1.5}, "`ema_decay` must be above 0 and at most 1"),
        ({"image_size": 0}, "`image_size` must be at least 8"),
        ({"image_size": 100000}, "`image_size` must be at least 8 and at most 4096"),
        ({"workers": -1}, "`workers` must be at least 0"),
        ({"train_subset": 0}, "`train_subset` must be at least 1"),
        ({"val_subset": -5}, "`val_subset` must be at least 1"),
        ({"seed": -1}, "`seed` must be at least 0"),
        ({"strides": [1, 2, 2]}, "`strides` must give 1 or 2 for each of the five stages"),
        ({"strides": [1, 3, 2, 2, 2]}, "`strides` must give 1 or 2"),
        ({"strides": "1 2 2 2 2"}, "`strides` must be of type list"),
        ({"device": "foo"}, "`device` must be cpu, cuda or cuda:N"),
        ({"amp": "int4"}, "`amp` must be one of none, bf16, fp16"),
        ({"data": "mnist"}, "`data` must be one of"),
        ({"layout": "resnet"}, "`layout` must be one of"),
        ({"nesterov": "yes"}, "`nesterov` must be of type bool"),
        ({"model": 7}, "`model` must be of type str"),
    ],
)
def test_every_training_value_is_checked_before_any_work(values: dict[str, object], message: str) -> None:
    with pytest.raises(TrainingError, match=message):
        TrainConfig.from_dict(values).validate()


def test_a_bad_value_in_a_config_file_is_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epochs": "ten", "output": str(tmp_path / "run")}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "repvgg train: error: --epochs must be of type int, got 'ten'."
    assert not (tmp_path / "run").exists(), "nothing was started"


def test_cuda_without_a_gpu_is_one_sentence(fashion: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TrainingError, match="no CUDA GPU is usable here; use cpu"):
        train(config(fashion, tmp_path / "run", device="cuda"))


def test_overwrite_is_never_saved_and_an_old_config_cannot_replace_a_run(
    fashion: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train(config(fashion, run, overwrite=True))
    saved = json.loads((run / "config.json").read_text())
    assert "overwrite" not in saved
    saved["overwrite"] = True  # as an earlier release wrote it
    (run / "config.json").write_text(json.dumps(saved))
    assert "overwrite" not in load_run_config(run / "config.json")
    before = files_of(run)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(TrainConfig.from_dict(load_run_config(run / "config.json")))
    assert files_of(run) == before


def test_a_finished_run_without_last_pt_is_not_replaced(fashion: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(fashion, run))
    (run / "last.pt").unlink()
    before = files_of(run)
    with pytest.raises(
        TrainingError, match=r"already holds a run \(config.json, metrics.jsonl, summary.json"
    ):
        train(config(fashion, run))
    assert files_of(run) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="is a file; give a folder"):
        train(config(fashion, tmp_path / "file"))


def test_resume_refuses_changed_options_and_extends_epochs_for_real(fashion: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(fashion, run, lr=0.05))
    with pytest.raises(TrainingError, match=r"Resuming cannot change `lr` \(0.05 -> 0.01\)"):
        train(config(fashion, run, lr=0.01), resume=True)
    with pytest.raises(TrainingError, match="cannot change `batch_size`"):
        train(config(fashion, run, lr=0.05, batch_size=16), resume=True)
    train(config(fashion, run, lr=0.05, epochs=3), resume=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[1]["lr"] > 0.01, "the extra epochs train: the cosine is stretched over 3 epochs"
    assert json.loads((run / "config.json").read_text())["epochs"] == 3, "config.json says what ran"
    # the memory format changes no result, so a run resumes in the other one
    train(config(fashion, run, lr=0.05, epochs=4, channels_last=False), resume=True)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_where_there_is_nothing_is_explained(fashion: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="Nothing to resume"):
        train(config(fashion, tmp_path / "empty"), resume=True)


def test_every_image_unreadable_stops_instead_of_training_on_nothing(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=2)
    for image in (root / "train").rglob("*.png"):
        image.write_bytes(b"not an image")
    options = {"data": "imagefolder", "image_size": 32, "batch_size": 2, "skip_bad_images": True}
    with pytest.raises(TrainingError, match="no readable training images"):
        train(config(root, tmp_path / "run", **options))


def test_a_diverged_validation_loss_stops_the_run(
    fashion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverged(*args: object, **kwargs: object) -> EvalResult:
        return EvalResult(top1=10.0, top5=50.0, loss=float("nan"), images=64, seconds=1.0)

    monkeypatch.setattr("repvgg.engine.training.evaluate", diverged)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="validation loss became nan after epoch 1: the run diverged"):
        train(config(fashion, run))
    assert not (run / "summary.json").exists(), "no summary claims the forms agree"


def test_results_are_strict_json() -> None:
    text = json_text({"loss": float("nan"), "rows": [float("inf"), 1.5], "ok": True})
    assert json.loads(text) == {"loss": None, "rows": [None, 1.5], "ok": True}
    assert "NaN" not in text and "Infinity" not in text


def test_non_finite_weights_are_named_by_convert_eval_and_predict(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = with_nan_in(repvgg.save_checkpoint(small_model(), tmp_path / "nan.safetensors"), "linear.weight")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (28, 28)).save(image)
    for argv in (
        ["convert", str(path), str(tmp_path / "out.safetensors")],
        ["eval", str(path), "--data-dir", str(fashion)],
        ["predict", str(path), str(image)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "weights that are not finite (linear.weight)" in err and "\n" not in err, argv
    assert not (tmp_path / "out.safetensors").exists()


def test_eval_and_quantize_use_the_checkpoint_s_image_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    run = tmp_path / "run"
    summary = train(config(root, run, data="imagefolder", image_size=40, batch_size=2))
    checkpoint = run / "model_train.safetensors"
    result = evaluate_checkpoint(checkpoint, data="imagefolder", data_dir=str(root))
    assert result.notes == () and math.isclose(result.top1, summary["train_form"]["top1"])
    resized = evaluate_checkpoint(checkpoint, data="imagefolder", data_dir=str(root), image_size=48)
    assert resized.notes == ("evaluated at 48 px, not at the 40 px the checkpoint was trained at",)
    import repvgg.studies.quantization as quantization

    sizes: list[int | None] = []
    real_build_data = quantization.build_data

    def recording_build_data(*args: object, image_size: int | None = None, **kwargs: object) -> object:
        sizes.append(image_size)
        return real_build_data(*args, image_size=image_size, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(quantization, "build_data", recording_build_data)
    quantization.quantize_checkpoint(
        checkpoint,
        tmp_path / "int8.safetensors",
        data="imagefolder",
        data_dir=str(root),
        calib=4,
        progress=False,
    )
    assert sizes == [40], "calibration images at the checkpoint's size, not 224 px"


def test_an_ablation_folder_with_other_settings_is_not_reused(fashion: Path, tmp_path: Path) -> None:
    output = tmp_path / "study"
    output.mkdir()
    shared = {"data_dir": str(fashion), "output": str(output), "variants": ["plain"], "seeds": 1}
    (output / "ablation_config.json").write_text(json.dumps({**vars(AblationConfig(**shared)), "epochs": 1}))
    with pytest.raises(ModelConfigError, match=r"other settings \(`epochs` \(1 -> 3\)\)"):
        run_ablation(AblationConfig(**shared, epochs=3))


def test_eval_on_non_finite_model_object_is_refused() -> None:
    model = small_model()
    with torch.no_grad():
        model.stage0.rbr_dense.bn.running_var.fill_(float("inf"))
    with pytest.raises(InferenceError, match="not finite"):
        repvgg.predict(model, [])


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "{ckpt}", "{ckpt}"],
        ["export", "{ckpt}", "{ckpt}", "--to", "onnx"],
        ["quantize", "{ckpt}", "{ckpt}", "--data-dir", "{data}"],
    ],
)
def test_no_command_writes_over_the_file_it_reads(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    before = checkpoint.read_bytes()
    argv = [part.format(ckpt=checkpoint, data=fashion) for part in command]
    assert main(argv) == 2
    assert "would replace the file it reads" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("foo", "must be cpu, cuda or cuda:N, got 'foo'"),
        ("gpu", "must be cpu, cuda or cuda:N"),
        ("cuda:x", "must"),
    ],
)
def test_a_device_name_is_checked_by_the_one_resolver(name: str, message: str) -> None:
    from repvgg.runtime.device import resolve_device

    with pytest.raises(InferenceError, match=message):
        resolve_device(name)
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InferenceError, match="no CUDA GPU is usable here"):
            resolve_device("cuda:0")


def test_what_a_foreign_checkpoint_cannot_say_is_said(tmp_path: Path) -> None:
    from repvgg.io.checkpoints import guessed, read_checkpoint

    model = small_model()
    ours = repvgg.save_checkpoint(model, tmp_path / "ours.safetensors")
    theirs = tmp_path / "theirs.pth"
    torch.save(repvgg.convert_state_dict(model.state_dict(), to="timm"), theirs)
    assert guessed(read_checkpoint(ours)) is None
    note = guessed(read_checkpoint(theirs))
    assert note is not None and "timm's format" in note and "strides (2, 2, 2, 2, 2) are assumed" in note


def test_commands_say_what_they_assume_about_a_foreign_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model()
    theirs = tmp_path / "authors.pth"
    torch.save(repvgg.convert_state_dict(model.state_dict(), to="official"), theirs)
    assert main(["convert", str(theirs), str(tmp_path / "deploy.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "the authors' format, which records no strides" in out and "are assumed" in out
    ours = repvgg.save_checkpoint(model, tmp_path / "ours.safetensors")
    assert main(["convert", str(ours), str(tmp_path / "deploy2.safetensors")]) == 0
    assert "are assumed" not in capsys.readouterr().out


def test_verify_names_what_differs_instead_of_printing_two_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_file = repvgg.save_checkpoint(small_model(), tmp_path / "train.safetensors")
    other = repvgg.reparameterize(small_model(strides=(1, 1, 2, 2, 2)))
    deploy_file = repvgg.save_checkpoint(other, tmp_path / "deploy.safetensors")
    assert main(["verify", str(train_file), str(deploy_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "(their strides differ)" in err and "{" not in err and "\n" not in err


def test_an_int8_file_whose_record_disagrees_with_its_tensors_is_one_sentence(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from repvgg.core.int8 import quantize_ptq
    from repvgg.io.checkpoints import save_quantized

    model = small_model()
    path = save_quantized(quantize_ptq(model, [torch.randn(4, 1, 28, 28)]), tmp_path / "int8.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    config["width_multiplier"] = [0.5, 0.5, 0.5, 0.5]  # another architecture than the tensors'
    metadata["config"] = json.dumps(config)
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(repvgg.RepVGGError, match=r"do not fit the architecture it records|does not match"):
        repvgg.load_checkpoint(path)


def test_a_malicious_training_state_is_refused_without_torch_s_advice(fashion: Path, tmp_path: Path) -> None:
    import pickle

    run = tmp_path / "run"
    train(config(fashion, run))

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    with (run / "last.pt").open("wb") as handle:
        pickle.dump({"model": Exploit()}, handle)
    with pytest.raises(repvgg.CheckpointError) as caught:
        train(config(fashion, run, epochs=2), resume=True)
    message = str(caught.value)
    assert "not unpickled for safety" in message and "weights_only" not in message and "\n" not in message
