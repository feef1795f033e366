"""Segmentation data (Fashion-MNIST mosaics, folder format) and `repvgg train-seg`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import repvgg
from repvgg.cli import main
from repvgg.core.reparam import relative_error, tolerance_for
from repvgg.engine.segmentation_data import build_segmentation_data
from repvgg.exceptions import DataError, RepVGGWarning
from tests.test_data import fake_fashion_mnist


def test_fashion_mosaics_label_garment_pixels_with_their_class(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fashion", train=16, test=8)
    bundle = build_segmentation_data("fashion-mnist-seg", root)
    assert bundle.num_classes == 11 and bundle.class_names[0] == "background" and bundle.in_chans == 1
    assert len(bundle.train) == 4 and len(bundle.val) == 2
    image, mask = bundle.val[1]
    assert image.shape == (1, 56, 56) and mask.shape == (56, 56) and mask.dtype == torch.long
    from repvgg.engine.data import fashion_mnist_split

    images, labels = fashion_mnist_split(root, train=False)
    top_left = images[4][0]  # sample 1 holds images 4-7, the first at the top left
    expected = (top_left > 0).long() * (int(labels[4]) + 1)
    assert torch.equal(mask[:28, :28], expected)
    assert torch.equal(bundle.val[1][0], image), "validation samples are deterministic"


def test_folder_format_reads_image_and_mask_pairs(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 50, 3), 100 * i, np.uint8)).save(
                tmp_path / split / "images" / f"{i}.jpg"
            )
            Image.fromarray(np.full((40, 50), i, np.uint8)).save(tmp_path / split / "masks" / f"{i}.png")
    bundle = build_segmentation_data("folder", tmp_path, num_classes=3, image_size=32)
    image, mask = bundle.val[1]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and set(mask.unique().tolist()) == {1}
    (tmp_path / "val" / "masks" / "1.png").unlink()
    with pytest.raises(DataError, match=r"has no mask for 1\.jpg"):
        build_segmentation_data("folder", tmp_path, num_classes=3)
    with pytest.raises(DataError, match=r"needs `data_dir` .* and `num_classes`"):
        build_segmentation_data("folder", tmp_path)


@pytest.mark.slow
def test_train_seg_trains_converts_and_keeps_miou(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_fashion_mnist(tmp_path / "fashion", train=64, test=32)
    arguments = ["train-seg", "--data-dir", str(root), "--epochs", "1", "--batch-size", "4"]
    arguments += ["--head-channels", "16", "--output", str(tmp_path / "run"), "--no-progress"]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1: train loss" in out and "mIoU identical after conversion: True" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_form"]["miou"] == summary["deploy_form"]["miou"]
    assert summary["changed_pixels"] == 0
    assert summary["class_names"][:2] == ["background", "T-shirt/top"]
    assert len(summary["deploy_form"]["class_iou"]) == 11 and "IoU per class: background " in out
    speed = summary["speed"]
    assert (
        speed["batch"] == 4 and speed["train_form_images_per_s"] > 0 and speed["deploy_form_images_per_s"] > 0
    )
    assert (tmp_path / "run" / "pspnet_deploy.safetensors").is_file()


def test_train_seg_starts_the_backbone_from_a_classification_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fake_fashion_mnist(tmp_path / "fashion", train=32, test=16)
    classifier = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1)
    weights = repvgg.save_checkpoint(classifier, tmp_path / "a0.safetensors")
    arguments = ["train-seg", "--data-dir", str(root), "--epochs", "1", "--batch-size", "4", "--lr", "1e-12"]
    arguments += ["--head-channels", "16", "--output", str(tmp_path / "run"), "--no-progress"]
    with pytest.warns(RepVGGWarning, match="classifier head .* was dropped"):
        assert main([*arguments, "--backbone-weights", str(weights)]) == 0
    trained = load_file(tmp_path / "run" / "pspnet_train.safetensors")
    kernels = {name: value for name, value in classifier.state_dict().items() if name.endswith("conv.weight")}
    assert len(kernels) > 20  # with --lr 1e-12 every backbone kernel is still the classifier's
    for name, value in kernels.items():
        assert torch.allclose(trained[f"backbone.{name}"], value, rtol=0, atol=1e-7), name
    rgb_model = repvgg.create_model("repvgg_a0")
    rgb = repvgg.save_checkpoint(rgb_model, tmp_path / "rgb.safetensors")
    with pytest.warns(
        RepVGGWarning, match="stem takes 3 input channels and the model 1: its kernels were summed"
    ):
        assert main([*arguments, "--backbone-weights", str(rgb), "--output", str(tmp_path / "run2")]) == 0
    stem = load_file(tmp_path / "run2" / "pspnet_train.safetensors")["backbone.stage0.rbr_dense.conv.weight"]
    assert torch.allclose(
        stem, rgb_model.stage0.rbr_dense.conv.weight.sum(1, keepdim=True), rtol=0, atol=1e-7
    )


def test_train_seg_follows_the_run_folder_rules_of_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    root = fake_fashion_mnist(tmp_path / "fashion", train=32, test=16)
    run = tmp_path / "run"
    arguments = ["train-seg", "--data-dir", str(root), "--batch-size", "4", "--head-channels", "16"]
    arguments += ["--output", str(run), "--no-progress"]
    assert main([*arguments, "--epochs", "1"]) == 0
    for name in ("last.pt", "metrics.jsonl", "config.json", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    def digest() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}

    before = digest()
    capsys.readouterr()
    assert main([*arguments, "--epochs", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err and digest() == before
    assert main([*arguments, "--epochs", "1", "--lr", "0.5", "--resume"]) == 2
    assert main([*arguments, "--epochs", "2", "--resume"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and "overwrite" not in json.loads((run / "config.json").read_text())
    assert main([*arguments, "--epochs", "1", "--overwrite"]) == 0


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A trained-looking PSPNet's two checkpoint files as train-seg writes them, and its dataset."""
    folder = tmp_path_factory.mktemp("segmenter")
    data = fake_fashion_mnist(folder / "fashion", train=16, test=16)
    bundle = build_segmentation_data("fashion-mnist-seg", data)
    model = repvgg.pspnet("repvgg_a0", bundle.num_classes, in_chans=1, head_channels=16)
    repvgg.randomize_batchnorm_(model)
    model.class_names, model.preprocessing = bundle.class_names, bundle.preprocessing
    model.eval()
    train_file = repvgg.save_checkpoint(model, folder / "pspnet_train.safetensors")
    deploy_file = repvgg.save_checkpoint(repvgg.reparameterize(model), folder / "pspnet_deploy.safetensors")
    return train_file, deploy_file, data


def test_a_pspnet_checkpoint_rebuilds_itself_in_both_forms(segmenter: tuple[Path, Path, Path]) -> None:
    train_file, deploy_file, _ = segmenter
    trained, deployed = repvgg.load_checkpoint(train_file), repvgg.load_checkpoint(deploy_file)
    assert isinstance(trained, repvgg.PSPNet) and isinstance(deployed, repvgg.PSPNet)
    assert repvgg.model_info(trained).form == "train" and repvgg.model_info(deployed).form == "deploy"
    assert deployed.class_names[0] == "background" and deployed.preprocessing.image_size == 56
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        difference = relative_error(deployed.eval()(x), trained.eval()(x))
    assert difference <= tolerance_for(torch.float32), "weights saved in float32: that entry of the table"


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_eval_scores_a_pspnet_checkpoint_with_miou(
    segmenter: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    train_file, deploy_file, data = segmenter
    scores = []
    for checkpoint in (train_file, deploy_file):
        results = tmp_path / f"{checkpoint.stem}{suffix}"
        argv = ["eval", str(checkpoint), "--data-dir", str(data), "--results-file", str(results)]
        assert main([*argv, "--no-progress", "--batch-size", "2"]) == 0
        out = capsys.readouterr().out
        assert "IoU per class: background " in out and "fashion-mnist-seg validation images" in out
        scores.append(out.splitlines()[-2].split("mIoU ")[1].split("%")[0])
        if suffix == ".json":
            record = json.loads(results.read_text())
            assert len(record["class_iou"]) == 11 and record["images"] == 4
        else:
            rows = results.read_text().splitlines()
            assert (
                rows[0] == "class,iou" and rows[1].startswith("background,") and rows[-2].startswith("mean,")
            )
    assert scores[0] == scores[1], "both forms of one network score alike"


def test_export_and_predict_take_a_pspnet_checkpoint(
    segmenter: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime

    _, deploy_file, _ = segmenter
    assert main(["export", str(deploy_file), str(tmp_path / "p.onnx")]) == 0
    assert "its input is 56x56 only" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "p.onnx"))
    assert session.run(None, {"images": np.zeros((3, 1, 56, 56), np.float32)})[0].shape == (3, 11, 56, 56)
    picture = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70), dtype=np.uint8)).save(picture)
    assert main(["predict", str(deploy_file), str(picture), "--output", str(tmp_path / "masks")]) == 0
    out = capsys.readouterr().out
    mask_file = tmp_path / "masks" / "photo_mask.png"
    assert f"-> {mask_file}" in out and "%" in out
    with Image.open(mask_file) as mask:
        assert mask.mode == "P" and mask.size == (70, 40) and int(np.asarray(mask).max()) < 11
    assert main(["predict", str(deploy_file), str(picture)]) == 2
    assert "its predictions are masks, written as PNGs into a folder" in capsys.readouterr().err


def test_mask_names_keep_relative_paths_and_never_clash() -> None:
    from repvgg.runtime.predict import mask_names

    names = mask_names(["in/a/img.png", "in/a/img.jpg", "in/b/img.png", "in/b/img_png.png", "in/c.PNG"])
    assert [str(n) for n in names] == [
        "a/img_png_mask.png",
        "a/img_jpg_mask.png",
        "b/img_mask.png",
        "b/img_png_mask.png",
        "c_mask.png",
    ]
    clash = mask_names(["x/img.png", "x/img.jpg", "x/img_png.bmp"])  # the third would take the first's name
    assert len(set(clash)) == 3 and str(clash[2]) == "img_png_2_mask.png"
    assert [str(n) for n in mask_names(["photo.png"])] == ["photo_mask.png"]


def test_predict_writes_one_mask_per_image_and_never_replaces_one(
    segmenter: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``a/img.png``, ``a/img.jpg`` and ``b/img.png`` once all wrote ``OUT/img_mask.png``: one file left."""
    _, deploy_file, _ = segmenter
    rng = np.random.default_rng(1)
    inputs = [tmp_path / "a" / "img.png", tmp_path / "a" / "img.jpg", tmp_path / "b" / "img.png"]
    for path in inputs:
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 20), dtype=np.uint8)).save(path)
    out = tmp_path / "masks"
    argv = ["predict", str(deploy_file), *map(str, inputs), "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["a/img_jpg_mask.png", "a/img_png_mask.png", "b/img_mask.png"]
    printed = capsys.readouterr().out
    assert all(f"{path}: " in printed for path in inputs)
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    (out / "b" / "img_mask.png").write_bytes(b"the user's own file")
    assert main(argv) == 2  # refused before any work: the masks are there
    assert "already holds 3 of the masks" in capsys.readouterr().err
    assert (out / "b" / "img_mask.png").read_bytes() == b"the user's own file"
    assert main([*argv, "--overwrite"]) == 0
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before
    folder_and_file = ["predict", str(deploy_file), str(tmp_path / "a"), str(inputs[0])]
    assert main([*folder_and_file, "--output", str(tmp_path / "again"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "again").rglob("*.png")) == [
        "img_jpg_mask.png",
        "img_png_mask.png",
    ]


def test_a_classifier_is_not_scored_on_a_segmentation_set(
    segmenter: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classifier = repvgg.save_checkpoint(
        repvgg.create_model("repvgg_a0", num_classes=10), tmp_path / "c.safetensors"
    )
    data = segmenter[2]
    assert main(["eval", str(classifier), "--data", "fashion-mnist-seg", "--data-dir", str(data)]) == 2
    assert "is a classifier, not a PSPNet" in capsys.readouterr().err
