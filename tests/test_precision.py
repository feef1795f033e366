"""``optimize(precision=...)``: bfloat16 and INT8 candidates beside every float32 backend, each judged on
held-out labelled images against a guard on the top-1 drop, the fastest that passes kept, every candidate
reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import repvgg
import repvgg.runtime.optimize as optimize_module
from repvgg.cli import main
from repvgg.exceptions import InferenceError
from repvgg.io.machine import cpu_features
from tests.helpers import small_model
from tests.test_data import fake_fashion_mnist


@pytest.fixture(scope="module")
def setting() -> dict[str, object]:
    torch.manual_seed(0)
    model = small_model(in_chans=1, num_classes=4).eval()
    images = torch.randn(96, 1, 28, 28)
    with torch.no_grad():
        labels = model(images).argmax(1)  # float32 is right on every image: any lost one is a drop
    eval_data = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 96, 32)]
    calibration = [torch.randn(16, 1, 28, 28) for _ in range(4)]
    return {"model": model, "eval_data": eval_data, "calibration": calibration, "example": images[:32]}


def _search(setting: dict[str, object], **options: object) -> repvgg.OptimizedModel:
    return repvgg.optimize(
        setting["model"],  # type: ignore[arg-type]
        backend="eager",
        precision="auto",
        example_input=setting["example"],  # type: ignore[arg-type]
        calibration=setting["calibration"],  # type: ignore[arg-type]
        eval_data=setting["eval_data"],  # type: ignore[arg-type]
        repeats=2,
        **options,  # type: ignore[arg-type]
    )


def test_the_fastest_candidate_within_the_guard_is_chosen_and_all_are_reported(
    setting: dict[str, object],
) -> None:
    chosen = _search(setting, max_top1_drop=100.0)
    rows = {(row.backend, row.precision): row for row in chosen.report}
    assert set(rows) == {("eager", "fp32"), ("eager", "bf16"), ("x86", "int8")}
    fp32 = rows[("eager", "fp32")]
    assert fp32.top1 == 100.0 and fp32.top1_drop == 0.0 and fp32.agreement == 100.0
    bf16 = rows[("eager", "bf16")]
    if not cpu_features()["fast_bf16"]:
        assert bf16.why_not == "this CPU has no bfloat16 instructions (avx512_bf16 or AMX)"
    timed = [row for row in chosen.report if row.images_per_s is not None]
    winner = max(timed, key=lambda row: row.images_per_s)
    assert (chosen.backend, chosen.precision) == (winner.backend, winner.precision) and winner.why_not is None
    assert all(row.why_not for row in chosen.report if row is not winner)
    assert rows[("x86", "int8")].agreement is not None and 0 <= rows[("x86", "int8")].agreement <= 100
    outputs = chosen(setting["example"])  # type: ignore[arg-type]
    assert outputs.shape == (32, 4) and outputs.dtype == torch.float32


def test_a_candidate_that_loses_accuracy_is_refused_by_the_guard(
    setting: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    def careless_quantizer(model: torch.nn.Module, calibration: object, **options: object) -> object:
        return lambda images: model(images.float()).roll(1, dims=1)  # every prediction moves one class on

    monkeypatch.setattr(optimize_module, "quantize_ptq", careless_quantizer)
    chosen = _search(setting, max_top1_drop=0.5)
    int8 = next(row for row in chosen.report if row.precision == "int8")
    assert int8.top1 == 0.0 and int8.agreement == 0.0
    assert int8.why_not == "top-1 drops 100.00 points (guard 0.5)" and int8.images_per_s is None
    assert chosen.precision != "int8"


def test_a_precision_search_needs_held_out_images_and_says_what_is_missing(
    setting: dict[str, object],
) -> None:
    with pytest.raises(InferenceError, match="needs held-out labelled images \\(`eval_data`\\)"):
        repvgg.optimize(setting["model"], precision="int8", example_input=setting["example"])  # type: ignore[arg-type]
    chosen = repvgg.optimize(
        setting["model"],  # type: ignore[arg-type]
        backend="eager",
        precision="int8",
        example_input=setting["example"],  # type: ignore[arg-type]
        eval_data=setting["eval_data"],  # type: ignore[arg-type]
        repeats=2,
    )
    int8 = next(row for row in chosen.report if row.precision == "int8")
    assert int8.why_not == "no calibration images were given (`calibration`)" and chosen.precision == "fp32"
    with pytest.raises(InferenceError, match="must be from 0 to 100 points, got 150"):
        _search(setting, max_top1_drop=150.0)
    with pytest.raises(InferenceError, match="Unknown precision 'fp8'"):
        repvgg.optimize(setting["model"], precision="fp8", example_input=setting["example"])  # type: ignore[arg-type]


def test_repvgg_optimize_writes_the_winner_and_eval_runs_it_that_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = fake_fashion_mnist(tmp_path / "fashion", train=64, test=64)
    model = small_model(in_chans=1, num_classes=10).eval()
    model.preprocessing = repvgg.Preprocessing(28, 28, (0.286,), (0.353,))
    checkpoint = repvgg.save_checkpoint(model, tmp_path / "c.safetensors")
    common = ["optimize", str(checkpoint), "--data-dir", str(data), "--backend", "eager", "--repeats", "2"]
    common += ["--calib", "32", "--max-drop", "100"]
    assert main([*common, str(tmp_path / "int8.safetensors"), "--precision", "int8"]) == 0
    out, steps = capsys.readouterr()
    steps = [line.split(" (")[0] for line in steps.splitlines()]  # not a terminal: a line per step, timed
    for expected in (  # never silent for minutes: each candidate named as it is built, judged and timed
        "optimize: reading {checkpoint}",
        "optimize: building eager/fp32",
        "optimize: building x86/int8",
        "optimize: judging eager/fp32, the reference",
        "optimize: judging x86/int8",
        "optimize: timing eager/fp32, x86/int8",
    ):
        assert expected.format(checkpoint=checkpoint) in steps, steps
    assert steps[-1].startswith("optimize: writing ")
    named, table = out.split("\n", 1)  # eager only: the winner can be no ONNX file
    assert named == f"the winner will be written to {tmp_path / 'int8.safetensors'}"
    assert table.startswith("backend      precision  images/s   vs fp32") and "x86          int8" in out
    chosen = out.splitlines()[-1]
    assert chosen.startswith("chose ") and "judged on 64 held-out images, guard 100 points" in chosen
    written = repvgg.load_checkpoint(tmp_path / "int8.safetensors")
    precision = "int8" if "chose x86 in int8" in chosen else "float32"
    assert repvgg.model_info(written).precision == precision
    assert main(["eval", str(tmp_path / "int8.safetensors"), "--data-dir", str(data), "--no-progress"]) == 0
    if not cpu_features()["fast_bf16"]:
        return
    assert main([*common, str(tmp_path / "bf16.safetensors"), "--precision", "bf16", "--no-progress"]) == 0
    assert "optimize:" not in capsys.readouterr().err, "--no-progress: no step lines"
    assert (
        main([*common, str(tmp_path / "bf16.safetensors"), "--precision", "bf16", "--max-drop", "100"]) == 0
    )
    if "chose eager in bf16" in capsys.readouterr().out:
        assert repvgg.model_info(repvgg.load_checkpoint(tmp_path / "bf16.safetensors")).runtime == {
            "backend": "eager",
            "precision": "bf16",
        }
        with safe_open(str(tmp_path / "bf16.safetensors"), "pt") as handle:  # the weights it runs with
            assert handle.metadata()["precision"] == "bfloat16"
        assert {t.dtype for t in load_file(tmp_path / "bf16.safetensors").values()} == {torch.bfloat16}
        assert (
            main(["eval", str(tmp_path / "bf16.safetensors"), "--data-dir", str(data), "--no-progress"]) == 0
        )
        assert "note: ran with eager in bfloat16, the way repvgg optimize recorded" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{c}", "{tmp}/out.txt"], "`output` is a .safetensors or .onnx file (the winner sets which)"),
        (["{c}", "{tmp}/o.safetensors", "--max-drop", "-1"], None),  # argparse: a number at least 0
    ],
)
def test_repvgg_optimize_refuses_mistakes_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str | None
) -> None:
    checkpoint = repvgg.save_checkpoint(small_model(in_chans=1, num_classes=10), tmp_path / "c.safetensors")
    filled = [a.format(c=checkpoint, tmp=tmp_path) for a in argv]
    try:
        code = main(["optimize", *filled])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert (
        code == 2
        and "Traceback" not in err
        and err.strip().splitlines()[-1].startswith("repvgg optimize: error:")
    )
    if message:
        assert message.replace("`output`", "--output") in err


def test_when_onnxruntime_wins_the_artefact_is_an_onnx_file_that_eval_and_predict_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = fake_fashion_mnist(tmp_path / "fashion", train=64, test=64)
    model = small_model(in_chans=1, num_classes=10).eval()
    model.preprocessing = repvgg.Preprocessing(28, 28, (0.286,), (0.353,))
    model.class_names = [f"class {i}" for i in range(10)]
    checkpoint = repvgg.save_checkpoint(model, tmp_path / "c.safetensors")
    argv = ["optimize", str(checkpoint), str(tmp_path / "fast.safetensors"), "--data-dir", str(data)]
    argv += ["--backend", "onnxruntime", "--precision", "int8", "--calib", "32", "--max-drop", "100"]
    assert main([*argv, "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime  int8" in out and f"wrote {tmp_path / 'fast.onnx'}" in out
    assert not (tmp_path / "fast.safetensors").exists(), "the winner set the suffix"
    loaded = repvgg.load_checkpoint(tmp_path / "fast.onnx")
    assert loaded.class_names == model.class_names and loaded.preprocessing == model.preprocessing
    precision = "int8" if "chose onnxruntime in int8" in out else "float32"
    assert repvgg.model_info(loaded).precision == precision
    assert main(["eval", str(tmp_path / "fast.onnx"), "--data-dir", str(data), "--no-progress"]) == 0
    assert "on 64 fashion-mnist validation images" in capsys.readouterr().out
    other = tmp_path / "other.onnx"  # a file the user did not name, that an ONNX winner would replace
    other.write_bytes(b"the user's own file")
    argv[2] = str(tmp_path / "other.safetensors")
    assert main([*argv, "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{other} exists and would be replaced if the winner is written as .onnx" in err
    assert other.read_bytes() == b"the user's own file"
    assert main([*argv, "--repeats", "1", "--overwrite"]) == 0
    assert f"the winner will be written to {other}" in capsys.readouterr().out and other.stat().st_size > 100


def test_an_onnx_file_is_a_model_for_every_command_and_a_foreign_one_is_read_from_its_shapes(
    tmp_path: Path,
) -> None:
    import onnx

    from repvgg.io.onnxfile import OnnxModel
    from repvgg.runtime.export import onnx_bytes
    from repvgg.studies.bench import counted_model

    model = small_model(in_chans=1, num_classes=4).eval()
    model.class_names = ["a", "b", "c", "d"]
    repvgg.export_model(model, tmp_path / "ours.onnx", to="onnx")
    ours = repvgg.load_checkpoint(tmp_path / "ours.onnx")
    assert isinstance(ours, OnnxModel) and ours.class_names == ["a", "b", "c", "d"] and ours.in_chans == 1
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), repvgg.reparameterize(model)(x), rtol=1e-4, atol=1e-4)
    assert isinstance(counted_model(ours), repvgg.RepVGG), "MACs are counted on its float twin"
    proto = onnx.load_from_string(onnx_bytes(model, x))
    del proto.metadata_props[:]
    (tmp_path / "foreign.onnx").write_bytes(proto.SerializeToString())
    foreign = repvgg.load_checkpoint(tmp_path / "foreign.onnx")
    assert (foreign.in_chans, foreign.num_classes, foreign.class_names) == (1, 4, None)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(repvgg.CheckpointError, match="is not an ONNX model onnxruntime can run"):
        repvgg.load_checkpoint(tmp_path / "junk.onnx")
    with pytest.raises(repvgg.CheckpointError, match="runs as it is and loads into no `model`"):
        repvgg.load_checkpoint(tmp_path / "ours.onnx", model)
    with pytest.raises(InferenceError, match="An ONNX file runs one way, on the CPU"):
        repvgg.optimize(ours, "inductor", example_input=x)


def test_a_pspnet_onnx_export_is_sent_to_its_checkpoint(tmp_path: Path) -> None:
    segmenter = repvgg.pspnet("repvgg_a0", 3, in_chans=1, head_channels=8).eval()
    repvgg.export_model(segmenter, tmp_path / "seg.onnx", to="onnx", input_shape=(1, 1, 32, 32))
    with pytest.raises(repvgg.CheckpointError, match="PSPNet's ONNX export, which runs with onnxruntime"):
        repvgg.load_checkpoint(tmp_path / "seg.onnx")


@pytest.mark.skipif(not cpu_features()["fast_bf16"], reason="this CPU has no bfloat16 instructions")
def test_bf16_runs_on_a_cpu_with_bf16_instructions() -> None:
    model = small_model(in_chans=1, num_classes=4).eval()
    x = torch.randn(4, 1, 28, 28)
    fast = repvgg.optimize(model, "eager", example_input=x, dtype=torch.bfloat16)
    assert fast.precision == "bf16" and fast(x).dtype == torch.float32
