"""The command line: commands run, and errors are one sentence, not a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from repvgg.cli import _build_parsers, _run_config, main, parameters_as_flags
from repvgg.engine.config import TrainConfig
from tests.test_data import fake_fashion_mnist
from tests.test_models import SPEC_COUNTS


def test_models_table_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == list(SPEC_COUNTS)
    for row in rows:
        train, deploy, gmacs = SPEC_COUNTS[row["model"]]
        assert (row["train_params"], row["deploy_params"]) == (train, deploy)
        assert row["gmacs_224"] == pytest.approx(gmacs, rel=0.005)
    assert rows[0]["paper_top1"] == 72.41


def test_models_table_for_terminal_and_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert "9,108,968" in capsys.readouterr().out
    assert main(["models", "--format", "markdown"]) == 0
    assert "| repvgg_d2se | 133,334,836 | 120,387,572 | 32.830 |" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_converts_and_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = fake_fashion_mnist(tmp_path / "fashion", train=256, test=32)
    arguments = ["demo", "--data-dir", str(data), "--train-subset", "256", "--epochs", "1"]
    arguments += ["--output", str(tmp_path / "demo"), "--batch-size", "8", "--repeats", "2"]
    arguments += ["--images", "3", "--backend", "onnxruntime"]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "checked in float64:" in out and "ok at tolerance 1e-10" in out and "agree)" in out
    assert "verify the saved pair" in out and "ok at tolerance 1e-04" in out
    assert "export ONNX: wrote" in out and "onnxruntime vs PyTorch" in out
    assert "predict 3 test images" in out and " right" in out
    assert "deploy form, onnxruntime" in out and "deploy / training speed" in out
    for name in ("model_train.safetensors", "model_deploy.safetensors", "model.onnx"):
        assert (tmp_path / "demo" / name).is_file()
    assert len(list((tmp_path / "demo" / "images").glob("*.png"))) == 3
    tiny = ["--images", "2", "--repeats", "1", "--backend", "eager", "--output", str(tmp_path / "tiny")]
    assert main([*arguments[:-6], *tiny]) == 0, "eager, the fast backend too, once ended in IndexError"
    assert "deploy / training speed: " in capsys.readouterr().out


def test_errors_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = fake_fashion_mnist(tmp_path / "fashion", train=64, test=32)
    assert main(["train", "--model", "repvgg_z9", "--data-dir", str(data), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("repvgg train: error: Unknown model 'repvgg_z9'") and "\n" not in err


COMMANDS = _build_parsers()[1]


@pytest.mark.parametrize(
    ("command", "message", "shown"),
    [
        ("train", "`batch_size` must be at least 1.", "--batch-size must be at least 1."),
        ("train", "lower `lr`, or drop `ema_decay`.", "lower --lr, or drop --ema."),
        (
            "train",
            "continue it (`resume`) or replace it (`overwrite`).",
            "continue it (--resume) or replace it (--overwrite).",
        ),
        ("quantize", "`calib` 0 gives no calibration images", "--calib 0 gives no calibration images"),
        (
            "predict",
            "`topk` and `batch_size` must be at least 1.",
            "--topk and --batch-size must be at least 1.",
        ),
        ("eval", "needs `num_classes` too", "needs num_classes too"),  # not an option of eval
        ("predict", "`checkpoint` is not a file", "checkpoint is not a file"),  # a positional argument
        (
            "eval",
            "install `apt-get install dataset-fashion-mnist`",
            "install `apt-get install dataset-fashion-mnist`",
        ),
        ("eval", "no parameter, 100% plain", "no parameter, 100% plain"),
    ],
)
def test_library_parameters_are_shown_as_the_command_s_flags(command: str, message: str, shown: str) -> None:
    assert parameters_as_flags(message, COMMANDS[command]) == shown


def test_a_library_error_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["quantize", str(tmp_path / "missing.safetensors"), str(tmp_path / "q.safetensors")]
    assert main([*arguments, "--calib", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("repvgg quantize: error: --calib 0 gives no calibration images;") and "`" not in err


def test_every_train_config_field_is_a_train_flag_with_help_and_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    actions = {action.dest: action for action in COMMANDS["train"]._actions}
    for field in dataclasses.fields(TrainConfig):
        action = actions[field.name]
        assert action.option_strings and field.metadata["help"] and action.default is argparse.SUPPRESS
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no wrapping inside a default
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    entries: dict[str, str] = {}  # flag -> its line(s) of the help, joined
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line.startswith("    ") and entries:
            entries[flag] += " " + line.strip()
    for field in dataclasses.fields(TrainConfig):
        entry = entries[actions[field.name].option_strings[0]]
        assert f"(default: {field.metadata.get('default', field.default)})" in entry, entry
    assert not any("(default: None)" in entry or "`" in entry for entry in entries.values())


def test_train_flags_make_the_same_config_as_before() -> None:
    parse = COMMANDS["train"].parse_args
    assert _run_config(parse([]), TrainConfig) == (TrainConfig(output="runs/repvgg_a0-fashion-mnist"), False)
    arguments = ["--ema", "0.999", "--no-progress", "--strides", "1", "2", "2", "2", "1", "--overwrite"]
    arguments += ["--nesterov", "--lr", "0.2", "--block", "qarepvgg", "--amp", "bf16", "--data-dir", "d"]
    config, resume = _run_config(
        parse([*arguments, "--epochs", "3", "--output", "o", "--resume"]), TrainConfig
    )
    assert resume and config == TrainConfig(
        ema_decay=0.999,
        progress=False,
        strides=[1, 2, 2, 2, 1],
        overwrite=True,
        nesterov=True,
        lr=0.2,
        block="qarepvgg",
        amp="bf16",
        data_dir="d",
        epochs=3,
        output="o",
    )


def test_every_command_s_help_shows_its_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "SUPPRESS" not in text and "(default: None)" not in text and "(default: False)" not in text
        assert "(default: True)" not in text, "a switch's help says what not giving it means"
        if command == "eval":
            assert "images per batch (default: 256)" in text and "mixed precision (default: none)" in text


def test_python_dash_m_and_console_script_start_without_importing_torch() -> None:
    code = "import sys, repvgg.cli; repvgg.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    help_text = subprocess.run(
        [sys.executable, "-m", "repvgg", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(command in help_text for command in ("models", "demo", "train", "eval"))


@pytest.mark.parametrize(
    "flags, channels_last", [([], True), (["--no-channels-last"], False), (["--channels-last"], True)]
)
def test_channels_last_is_the_default_and_can_be_turned_off(flags: list[str], channels_last: bool) -> None:
    config, _ = _run_config(COMMANDS["train"].parse_args(flags), TrainConfig)
    assert config.channels_last is channels_last
