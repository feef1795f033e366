"""Writing files: failures leave no damage and no temporary files, and say what to do in one sentence."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import repvgg
from repvgg.cli import main
from repvgg.exceptions import CheckpointError, ConversionError, ExportError, RepVGGError
from repvgg.io.checkpoints import save_training_state
from repvgg.io.files import atomic_write, refuse_same_file, writable_or_raise
from tests.helpers import small_model

ORIGINAL = b"the good file that was here before"

try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - safetensors is a dependency
    SafetensorError = RuntimeError  # type: ignore[assignment,misc]


def _failing(error: BaseException) -> Callable[[Path], None]:
    """A writer that gets part of the way (a half-written temporary file), then fails with ``error``."""

    def write(target: Path) -> None:
        target.write_bytes(b"half a file")
        raise error

    return write


def _chained_os_error() -> RuntimeError:
    try:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    except OSError as cause:
        error = RuntimeError("serialization went wrong")
        error.__cause__ = cause
        return error


FULL_DISKS = {
    "oserror-enospc": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), CheckpointError, "no space"),
    "torch-stream-writer": (
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        CheckpointError,
        "failed writing",
    ),
    "torch-unexpected-pos": (
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        ExportError,
        "unexpected pos",
    ),
    "safetensors": (
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        ExportError,
        "no space",
    ),
    "oserror-in-chain": (_chained_os_error(), ConversionError, "quota"),
    "permission": (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), CheckpointError, "permission"),
}


def _leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(ORIGINAL)
    return path


@pytest.mark.parametrize("name", list(FULL_DISKS))
def test_io_failure_becomes_one_sentence_and_leaves_nothing(destination: Path, name: str) -> None:
    error, error_type, words = FULL_DISKS[name]
    with pytest.raises(error_type) as raised:
        atomic_write(destination, _failing(error), what="the model", error_type=error_type)
    message = str(raised.value)
    assert "\n" not in message
    assert words in message.lower()
    assert str(destination) in message and "the model" in message
    assert message.rstrip().endswith(".") and ";" in message  # the cause, then the remedy
    assert destination.read_bytes() == ORIGINAL
    assert _leftovers(destination.parent, destination.name) == []


@pytest.mark.parametrize(
    "error",
    [ValueError("a bug in the writer"), KeyError("tensor"), CheckpointError("Already one sentence.")],
    ids=["value-error", "key-error", "repvgg-error"],
)
def test_other_errors_are_reraised_unchanged_without_temporary(destination: Path, error: Exception) -> None:
    with pytest.raises(type(error)) as raised:
        atomic_write(destination, _failing(error))
    assert raised.value is error
    assert destination.read_bytes() == ORIGINAL
    assert _leftovers(destination.parent, destination.name) == []


def test_interrupt_removes_temporary(destination: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        atomic_write(destination, _failing(KeyboardInterrupt()))
    assert destination.read_bytes() == ORIGINAL
    assert _leftovers(destination.parent, destination.name) == []


@pytest.fixture
def sleeping_pid() -> Iterator[int]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_writers_are_removed(destination: Path, sleeping_pid: int) -> None:
    dead = _dead_pid()
    folder = destination.parent
    stale = folder / f".{destination.name}.{dead}.tmp"
    live = folder / f".{destination.name}.{sleeping_pid}.tmp"
    other_destination = folder / f".other.safetensors.{dead}.tmp"
    not_ours = folder / f".{destination.name}.notapid.tmp"
    for path in (stale, live, other_destination, not_ours):
        path.write_bytes(b"left behind")
    atomic_write(destination, lambda target: target.write_bytes(b"new"))
    assert destination.read_bytes() == b"new"
    assert not stale.exists()
    assert live.read_bytes() == b"left behind"
    assert other_destination.exists() and not_ours.exists()


def _private_writer(target: Path) -> None:
    """Writes like libraries that create their file 0600."""
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(b"new")


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664, 0o444])
def test_replacing_keeps_the_permission_bits(destination: Path, mode: int) -> None:
    destination.chmod(mode)
    atomic_write(destination, _private_writer)
    assert destination.read_bytes() == b"new"
    assert destination.stat().st_mode & 0o7777 == mode


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_new_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "new" / "model.safetensors"
    previous = os.umask(umask)
    try:
        atomic_write(path, _private_writer)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o7777 == 0o666 & ~umask


def test_refuse_same_file(tmp_path: Path) -> None:
    source = tmp_path / "m.safetensors"
    source.write_bytes(ORIGINAL)
    link = tmp_path / "link.safetensors"
    link.symlink_to(source)
    hard = tmp_path / "hard.safetensors"
    os.link(source, hard)
    other = tmp_path / "other.safetensors"
    other.write_bytes(ORIGINAL)
    spelled_differently = tmp_path / "sub" / ".." / "m.safetensors"
    for output in (source, str(source), link, hard, spelled_differently):
        with pytest.raises(ConversionError, match="would replace the file it reads") as raised:
            refuse_same_file(source, output, ConversionError)
        assert "\n" not in str(raised.value)
    refuse_same_file(source, other, ConversionError)
    refuse_same_file(source, tmp_path / "not-yet.safetensors", ConversionError)


def test_writable_or_raise_refuses_a_file_as_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    for output in (blocker / "out.onnx", blocker / "deeper" / "out.onnx"):
        with pytest.raises(ExportError, match="is a file, not a folder") as raised:
            writable_or_raise(output, ExportError)
        assert "\n" not in str(raised.value)
        with pytest.raises(CheckpointError, match="is a file, not a folder"):
            atomic_write(output, lambda target: target.write_bytes(b"x"))
    assert blocker.read_bytes() == b"x"
    with pytest.raises(ExportError, match="is a folder"):
        writable_or_raise(tmp_path, ExportError)
    writable_or_raise(tmp_path / "new" / "out.onnx", ExportError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_writable_or_raise_refuses_a_read_only_file(destination: Path) -> None:
    destination.chmod(0o444)
    with pytest.raises(CheckpointError, match="read-only"):
        writable_or_raise(destination)


def test_cli_convert_onto_its_own_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = repvgg.save_checkpoint(small_model(), tmp_path / "m.safetensors")
    before = checkpoint.read_bytes()
    assert main(["convert", str(checkpoint), str(checkpoint)]) == 2
    error = capsys.readouterr().err.strip()
    assert "would replace the file it reads" in error and "\n" not in error
    assert checkpoint.read_bytes() == before
    assert _leftovers(tmp_path, checkpoint.name) == []


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, where root may mount one; skipped elsewhere."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        unmounted = subprocess.run(["umount", str(folder)], capture_output=True, check=False)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)
            pytest.fail(f"the tmpfs stayed busy: {unmounted.stderr.decode().strip()}")


def test_real_full_disk(full_disk: Path) -> None:
    model = small_model(num_classes=1000)
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1 << 20
    with pytest.raises(CheckpointError, match="No space left on device") as raised:
        repvgg.save_checkpoint(model, full_disk / "m.safetensors")
    assert "\n" not in str(raised.value)
    assert list(full_disk.iterdir()) == []
    state = {"model": model.state_dict(), "epoch": 1, "padding": torch.zeros(1 << 19)}
    with pytest.raises(CheckpointError, match=r"the training state .*No space left on device") as raised:
        save_training_state(full_disk / "last.pt", state, model)
    assert "\n" not in str(raised.value)
    assert list(full_disk.iterdir()) == []
    # torch.save's writer held the removed temporary file open (and its space) while the error lived.
    usage = os.statvfs(full_disk)
    assert usage.f_bavail * usage.f_frsize > 1 << 19


def test_error_types_are_repvgg_errors() -> None:
    assert all(issubclass(error_type, RepVGGError) for _, error_type, _ in FULL_DISKS.values())
