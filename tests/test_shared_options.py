"""Every command speaks one vocabulary: the shared options have one flag and one meaning wherever they
appear, and each one a command accepts reaches the work it does (a flag that is accepted and ignored is
worse than none)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import repvgg
from repvgg.cli import SHARED_OPTIONS, _build_parsers, _field_option, main
from repvgg.engine.config import TrainConfig
from repvgg.engine.training import train
from tests.helpers import small_model
from tests.test_data import fake_fashion_mnist

_, COMMANDS = _build_parsers()
EVERY = set(SHARED_OPTIONS)
#: The shared options of each command; each leaving-out says why it would mean nothing there.
EXPECTED = {
    "train": EVERY,
    "demo": EVERY,
    "ablate": EVERY,
    "train-seg": EVERY,
    "quantize": EVERY,  # --device: cpu only, said in its help; a GPU is refused in one sentence
    "eval": EVERY - {"log_interval"},  # nothing is trained
    "predict": EVERY - {"log_interval"},
    "bench": EVERY - {"workers", "log_interval"},  # times random batches: no data to read, nothing trained
    "export": {"batch_size", "image_size", "output"},  # traced and checked on the CPU
    "optimize": EVERY - {"log_interval"},  # nothing trained; its progress is the candidates' steps
    "convert": {"output"},  # float64 arithmetic on the CPU, no data
    "verify": set(),  # compares two files: nothing to read in batches, nothing written
    "models": set(),  # prints a table
    "shard": {"progress"},  # copies image files into tars: no model, no batches; OUTPUT is its argument
}
POSITIONALS = {  # what each command needs besides options, to be parsed
    "eval": ["c.safetensors"],
    "predict": ["c.safetensors", "x.png"],
    "export": ["c.safetensors", "m.onnx"],
    "convert": ["c.safetensors", "d.safetensors"],
    "quantize": ["c.safetensors", "q.safetensors"],
    "optimize": ["c.safetensors", "o.safetensors"],
    "verify": ["c.safetensors"],
    "shard": ["images", "shards"],
}
VALUES = {  # a value for each shared option, and what the parsed namespace then holds
    "device": ("cpu", "cpu"),
    "workers": ("3", 3),
    "batch_size": ("7", 7),
    "image_size": ("40", 40),
    "log_interval": ("5", 5),
    "output": ("out/place", "out/place"),
}


def test_every_command_has_its_shared_options_under_one_name() -> None:
    assert set(COMMANDS) == set(EXPECTED), "a new command must say which shared options it takes"
    for command, parser in COMMANDS.items():
        flags = {flag for action in parser._actions for flag in action.option_strings}
        have = {name for name in SHARED_OPTIONS if set(_field_option(name)[0]) & flags}
        assert have == EXPECTED[command], command


@pytest.mark.parametrize("command", sorted(c for c in EXPECTED if EXPECTED[c]))
def test_every_shared_option_parses_to_the_same_meaning(command: str) -> None:
    parser = COMMANDS[command]
    for name in sorted(EXPECTED[command]):
        flag = _field_option(name)[0][0]
        if name == "progress":
            args, _ = parser.parse_known_args([*POSITIONALS.get(command, []), flag])
            assert args.progress is False, command
            continue
        given, parsed = VALUES[name]
        positionals = POSITIONALS.get(command, [])
        if name == "output" and command in ("export", "convert", "quantize", "optimize"):
            positionals = positionals[:1]  # the output given as the option instead
        args, _ = parser.parse_known_args([*positionals, flag, given])
        dest = "results_file" if (command, name) == ("eval", "output") else name
        assert getattr(args, dest) == parsed, (command, name)


@pytest.mark.parametrize("command", ["convert", "export"])
def test_the_output_file_is_positional_or_an_option_but_not_two(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "c.safetensors")
    name = "d.safetensors" if command == "convert" else "m.onnx"
    assert main([command, str(checkpoint), str(tmp_path / "a" / name)]) == 0
    assert main([command, str(checkpoint), "--output", str(tmp_path / "b" / name)]) == 0
    assert (tmp_path / "a" / name).is_file() and (tmp_path / "b" / name).is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main([command, str(checkpoint), str(tmp_path / name), "--output", str(tmp_path / "x" / name)])
    assert exit.value.code == 2 and "two output files were given" in capsys.readouterr().err


def test_export_takes_the_format_from_the_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "c.safetensors")
    assert main(["export", str(checkpoint), str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out
    assert main(["export", str(checkpoint), str(tmp_path / "m.pt")]) == 0
    assert "torch.jit.load vs PyTorch" in capsys.readouterr().out
    assert main(["export", str(checkpoint), "--to", "onnx", str(tmp_path / "m.txt")]) == 2
    err = capsys.readouterr().err
    assert "m.txt is not a onnx file name: name it m.onnx" in err and not (tmp_path / "m.txt").exists()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for index in range(6):
        pixels = torch.randint(0, 256, (36, 36), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def _rows(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open()))[1:]


def test_predict_reads_with_workers_and_at_another_size(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model(in_chans=1, num_classes=3)
    model.preprocessing = repvgg.Preprocessing(image_size=32, resize=32, mean=(0.5,), std=(0.25,))
    checkpoint = repvgg.save_checkpoint(model.eval(), tmp_path / "c.safetensors")
    common = ["predict", str(checkpoint), str(images), "--topk", "3", "--batch-size", "4", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "w0.csv")]) == 0
    assert main([*common, "--workers", "2", "--output", str(tmp_path / "w2.csv")]) == 0
    assert _rows(tmp_path / "w2.csv") == _rows(tmp_path / "w0.csv"), "workers change nothing but speed"
    assert main([*common, "--image-size", "24", "--output", str(tmp_path / "s24.csv")]) == 0
    assert len(_rows(tmp_path / "s24.csv")) == 6
    assert _rows(tmp_path / "s24.csv") != _rows(tmp_path / "w0.csv"), "the size reached the preprocessing"


def test_preprocessing_at_another_size_keeps_the_ratio_of_resize_to_crop() -> None:
    imagenet = repvgg.Preprocessing(image_size=224, resize=256, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert imagenet.at_size(112).resize == 128 and imagenet.at_size(112).image_size == 112


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), train=128, test=32)


@pytest.mark.parametrize("interval, lines", [(2, ["step 2/4", "step 4/4"]), (0, [])])
def test_without_a_bar_a_run_prints_a_line_every_log_interval_steps(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], interval: int, lines: list[str]
) -> None:
    config = TrainConfig(
        data_dir=str(fashion), output=str(tmp_path), epochs=1, batch_size=32, log_interval=interval
    )  # the progress bar is asked for, but standard error here is no terminal: lines instead
    train(config)
    captured = capsys.readouterr()
    steps = re.findall(
        r"epoch 1/1 (step \d/4): loss [\d.]+, top-1 [\d.]+%, lr [\d.e-]+, \d+ img/s", captured.out
    )
    assert steps == lines
    assert "\r" not in captured.err, "no carriage-return bar where output is not a terminal"
