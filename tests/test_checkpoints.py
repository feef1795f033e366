"""Checkpoints: our format round-trips, every format users hold loads, and mistakes are explained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import repvgg
from repvgg import CheckpointError
from repvgg.io.formats import convert_state_dict, detect_format
from tests.helpers import relative_error, trained_looking

X = torch.randn(2, 3, 64, 56)


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


@pytest.mark.parametrize("deploy", [False, True])
def test_own_format_rebuilds_the_model_with_nothing_else(tmp_path: Path, deploy: bool) -> None:
    model = trained_looking("repvgg_b1g4", num_classes=3)
    if deploy:
        model = repvgg.reparameterize(model)
    path = repvgg.save_checkpoint(model, tmp_path / "sub" / "m.safetensors", class_names=["a", "b", "c"])
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "repvgg" and metadata["model_name"] == "repvgg_b1g4"
    assert metadata["form"] == ("deploy" if deploy else "train")
    assert json.loads(metadata["config"])["num_classes"] == 3
    loaded = repvgg.load_checkpoint(path)
    assert isinstance(loaded, repvgg.RepVGG)
    assert loaded.model_name == "repvgg_b1g4" and loaded.deploy == deploy
    assert loaded.class_names == ["a", "b", "c"]
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)
    assert not list(tmp_path.glob("sub/.*tmp")), "no temporary file is left behind"


def test_own_format_keeps_options_that_weights_do_not_show(tmp_path: Path) -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=10, in_chans=1, strides=(1, 1, 2, 2, 2))
    loaded = repvgg.load_checkpoint(repvgg.save_checkpoint(model, tmp_path / "a0.safetensors"))
    assert loaded.config == model.config


def test_block_design_is_saved_and_a_mismatch_is_named(tmp_path: Path) -> None:
    model = trained_looking("repvgg_a0", num_classes=10, block="qarepvgg")
    path = repvgg.save_checkpoint(model, tmp_path / "qa.safetensors")
    loaded = repvgg.load_checkpoint(path)
    assert loaded.block == "qarepvgg" and loaded.config == model.config
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"trained with 'qarepvgg' blocks.*block='qarepvgg'"):
        repvgg.load_checkpoint(path, repvgg.create_model("repvgg_a0", num_classes=10))


def test_class_names_must_match_the_classes(tmp_path: Path) -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=3, deploy=True)
    with pytest.raises(CheckpointError, match="one name per class"):
        repvgg.save_checkpoint(model, tmp_path / "m.safetensors", class_names=["a"])


def test_save_to_an_unwritable_place_is_explained(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = repvgg.create_model("repvgg_a0", num_classes=3, deploy=True)
    with pytest.raises(CheckpointError, match="Cannot write the checkpoint"):
        repvgg.save_checkpoint(model, blocker / "m.safetensors")


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    model = repvgg.create_model("repvgg_a0", num_classes=3, deploy=True)
    repvgg.save_checkpoint(model, path)
    before = path.read_bytes()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("repvgg.io.checkpoints.save_file", fail)
    with pytest.raises(CheckpointError, match="No space left"):
        repvgg.save_checkpoint(model, path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("deploy", [False, True])
@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"state_dict": sd, "epoch": 3, "best_acc": 71.2},
        lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
    ],
    ids=["plain", "module-prefix", "state_dict-wrapper", "model-wrapper-and-prefix"],
)
def test_authors_state_dicts_load_from_files(tmp_path: Path, deploy: bool, wrap) -> None:  # type: ignore[no-untyped-def]
    model = trained_looking("repvgg_a0", num_classes=10)
    if deploy:
        model = repvgg.reparameterize(model)
    path = tmp_path / "authors.pth"
    torch.save(wrap(model.state_dict()), path)
    loaded = repvgg.load_checkpoint(path)
    assert loaded.model_name == "repvgg_a0" and loaded.deploy == deploy and loaded.num_classes == 10
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


@pytest.mark.parametrize("target", ["timm", "mmpretrain", "official", "native"])
@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1g2", "repvgg_d2se"])
def test_convert_state_dict_round_trips(name: str, target: str) -> None:
    with torch.device("meta"):
        model = repvgg.create_model(name, num_classes=5)
    state = model.state_dict()
    converted = convert_state_dict(state, to=target)
    assert len(converted) == len(state)
    assert detect_format(converted) == ("official" if target == "native" else target)
    back = convert_state_dict(converted, to="native")
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)


def test_key_names_of_the_other_ecosystems() -> None:
    with torch.device("meta"):
        model = repvgg.create_model("repvgg_d2se", num_classes=5)
    timm = convert_state_dict(model.state_dict(), to="timm")
    mm = convert_state_dict(model.state_dict(), to="mmpretrain")
    # Names as they stand in timm's byobnet and mmpretrain's RepVGG backbone.
    for key in [
        "stem.conv_kxk.conv.weight",
        "stem.conv_1x1.bn.running_var",
        "stem.attn.fc1.weight",
        "stages.0.1.identity.weight",
        "stages.3.0.attn.fc2.bias",
        "head.fc.weight",
    ]:
        assert key in timm
    for key in [
        "backbone.stem.branch_3x3.conv.weight",
        "backbone.stem.branch_3x3.norm.weight",
        "backbone.stage_1.1.branch_norm.running_var",
        "backbone.stage_4.0.branch_1x1.norm.bias",
        "backbone.stage_2.3.se_layer.conv1.conv.weight",
        "backbone.stage_2.3.se_layer.conv2.conv.bias",
        "head.fc.bias",
    ]:
        assert key in mm


def test_mmpretrain_checkpoint_file_loads(tmp_path: Path) -> None:
    model = trained_looking("repvgg_b0", num_classes=10)
    state = convert_state_dict(model.state_dict(), to="mmpretrain")
    path = tmp_path / "mm.pth"
    torch.save({"meta": {"epoch": 120, "mmpretrain_version": "1.2.0"}, "state_dict": state}, path)
    loaded = repvgg.load_checkpoint(path)
    assert loaded.model_name == "repvgg_b0"
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


def test_loading_into_a_given_model_is_strict_and_returns_it() -> None:
    model = trained_looking("repvgg_a0", num_classes=10)
    target = repvgg.create_model("repvgg_a0", num_classes=10)
    assert repvgg.load_checkpoint(convert_state_dict(model.state_dict(), to="timm"), model=target) is target
    torch.testing.assert_close(outputs(target), outputs(model), rtol=0, atol=0)


def test_deploy_checkpoint_into_train_model_says_what_to_do() -> None:
    deployed = repvgg.reparameterize(trained_looking("repvgg_a0"))
    with pytest.raises(CheckpointError, match=r"deploy-form .* build the model with deploy=True"):
        repvgg.load_checkpoint(deployed.state_dict(), model=repvgg.create_model("repvgg_a0"))


def test_train_checkpoint_into_deploy_model_says_what_to_do() -> None:
    model = repvgg.create_model("repvgg_a0")
    with pytest.raises(CheckpointError, match=r"training-form .* repvgg.reparameterize"):
        repvgg.load_checkpoint(model.state_dict(), model=repvgg.create_model("repvgg_a0", deploy=True))


def test_other_number_of_classes_is_explained() -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=1000, deploy=True)
    with pytest.raises(CheckpointError, match=r"1000 classes but the model's has 10: .*num_classes=1000"):
        repvgg.load_checkpoint(
            model.state_dict(), model=repvgg.create_model("a0", num_classes=10, deploy=True)
        )


def test_other_variant_is_named_with_offending_keys() -> None:
    a1 = repvgg.create_model("repvgg_a1", deploy=True)
    with pytest.raises(CheckpointError) as caught:
        repvgg.load_checkpoint(a1.state_dict(), model=repvgg.create_model("repvgg_a0", deploy=True))
    message = str(caught.value)
    assert "checkpoint is repvgg_a1" in message and "model is repvgg_a0" in message
    assert "wrong shape stage0.rbr_reparam.weight" in message
    assert message.count("\n") == 0


def test_nothing_is_loaded_when_a_check_fails() -> None:
    target = repvgg.create_model("repvgg_a0", num_classes=10, deploy=True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    other = repvgg.create_model("repvgg_a0", num_classes=11, deploy=True)
    with pytest.raises(CheckpointError):
        repvgg.load_checkpoint(other.state_dict(), model=target)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"No checkpoint at .*nope\.pth: check the path"):
        repvgg.load_checkpoint(tmp_path / "nope.pth")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a folder"):
        repvgg.load_checkpoint(tmp_path)


def test_truncated_files(tmp_path: Path) -> None:
    model = repvgg.create_model("repvgg_a0", num_classes=3, deploy=True)
    ours = repvgg.save_checkpoint(model, tmp_path / "m.safetensors")
    ours.write_bytes(ours.read_bytes()[: ours.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated safetensors"):
        repvgg.load_checkpoint(ours)
    theirs = tmp_path / "m.pth"
    torch.save(model.state_dict(), theirs)
    theirs.write_bytes(theirs.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="damaged or truncated PyTorch file"):
        repvgg.load_checkpoint(theirs)


@pytest.mark.parametrize("content", ["hello, this is not a model\n", "pear-tree-42\n", "\x00" * 64])
def test_not_a_checkpoint_names_the_known_formats(tmp_path: Path, content: str) -> None:
    text = tmp_path / "notes.txt"
    text.write_text(content)
    with pytest.raises(
        CheckpointError, match=r"not a checkpoint in any format repvgg knows .*safetensors.*timm"
    ):
        repvgg.load_checkpoint(text)


class Payload:
    """Stands for an arbitrary pickled object, which must never be unpickled."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": repvgg.create_model("a0", deploy=True).state_dict(), "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="not unpickled for safety"):
        repvgg.load_checkpoint(path)


def test_foreign_network_is_explained() -> None:
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}
    with pytest.raises(CheckpointError, match="not a checkpoint in a known format"):
        repvgg.load_checkpoint(resnet_like)
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        repvgg.load_checkpoint({"epoch": 3})


def test_a_network_containing_repvgg_saves_and_loads_with_model(tmp_path: Path) -> None:
    from tests.test_reparam import TinySegmenter

    model = repvgg.randomize_batchnorm_(TinySegmenter(), seed=5).eval()
    path = repvgg.save_checkpoint(model, tmp_path / "seg.safetensors")
    with pytest.raises(CheckpointError, match="neither a RepVGG nor a PSPNet over one"):
        repvgg.load_checkpoint(path)
    loaded = repvgg.load_checkpoint(path, model=TinySegmenter()).eval()
    with torch.no_grad():
        assert relative_error(loaded(X)["out"], model(X)["out"]) == 0


def test_half_converted_model_cannot_be_saved(tmp_path: Path) -> None:
    model = repvgg.create_model("repvgg_a0").eval()
    model.stage1[0].reparameterize()
    with pytest.raises(CheckpointError, match="convert all of them"):
        repvgg.save_checkpoint(model, tmp_path / "m.safetensors")


def test_unknown_target_format() -> None:
    with pytest.raises(CheckpointError, match=r"choose one of native, official, timm, mmpretrain\."):
        convert_state_dict(repvgg.create_model("a0", deploy=True).state_dict(), to="onnx")


def test_files_written_before_the_model_record_still_load(tmp_path: Path) -> None:
    """Version-1 files of earlier releases: the same keys, a config that names its layout, no precision."""
    from safetensors.torch import save_file

    model = trained_looking("repvgg_a0", num_classes=10, in_chans=1, strides=(1, 2, 2, 2, 2))
    metadata = {
        "format": "repvgg",
        "format_version": "1",
        "form": "train",
        "module_type": "RepVGG",
        "class_names": json.dumps([f"c{i}" for i in range(10)]),
        "preprocessing": json.dumps({"image_size": 28, "resize": 28, "mean": [0.286], "std": [0.353]}),
        "config": json.dumps({**model.config, "layout": "repvgg"}),
        "model_name": "repvgg_a0",
    }
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    loaded = repvgg.load_checkpoint(path)
    assert loaded.strides == (1, 2, 2, 2, 2) and loaded.class_names[3] == "c3"
    assert loaded.info.precision == "float32" and loaded.preprocessing.image_size == 28


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("config", "{not json", "damaged"),
        ("config", "[1, 2]", "damaged"),
        ("class_names", json.dumps(["a", "b"]), "2 class names for a model with 10 classes"),
        ("class_names", json.dumps([1, 2]), "damaged"),
        ("preprocessing", json.dumps({"image_size": 0, "resize": 28, "mean": [0], "std": [1]}), "damaged"),
        (
            "preprocessing",
            json.dumps({"image_size": 100000, "resize": 100000, "mean": [0], "std": [1]}),
            "damaged",
        ),
        ("preprocessing", json.dumps({"image_size": 28, "resize": 28, "mean": [0], "std": [0]}), "damaged"),
        ("form", "sideways", "damaged"),
    ],
)
def test_a_damaged_model_record_is_one_sentence(tmp_path: Path, key: str, value: str, reason: str) -> None:
    from safetensors.torch import save_file

    model = trained_looking("repvgg_a0", num_classes=10)
    path = repvgg.save_checkpoint(model, tmp_path / "good.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), key: value}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=reason):
        repvgg.load_checkpoint(path)


def test_a_bfloat16_model_is_stored_in_bfloat16_and_loads_as_float32(tmp_path: Path) -> None:
    """``repvgg optimize`` writes the weights a bf16 winner runs with: half the size, recorded as bfloat16."""
    from tests.helpers import small_model

    model = repvgg.reparameterize(small_model().eval()).to(torch.bfloat16)
    path = repvgg.save_checkpoint(model, tmp_path / "bf16.safetensors")
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["precision"] == "bfloat16"
    assert {t.dtype for t in load_file(path).values()} == {torch.bfloat16}
    loaded = repvgg.load_checkpoint(path)
    read = loaded.state_dict()
    for name, stored in model.state_dict().items():
        assert read[name].dtype == torch.float32 and torch.equal(read[name], stored.float()), name
    # the loaded model is float32 in memory, so saving it again writes float32 and says so
    again = repvgg.save_checkpoint(loaded, tmp_path / "again.safetensors")
    with safe_open(str(again), "pt") as handle:
        assert handle.metadata()["precision"] == "float32"
