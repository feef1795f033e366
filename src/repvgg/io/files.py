"""Writing files so that a failure never leaves a damaged file where a good one was."""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from repvgg.exceptions import CheckpointError, RepVGGError

PathLike = str | os.PathLike[str]

# What safetensors (SafetensorError) and torch.save (RuntimeError) say when the disk fails under them:
# "Error while serializing: I/O error: No space left on device (os error 28)", "PytorchStreamWriter failed
# writing file data/0: file write failed", "[enforce fail at inline_container.cc:672] . unexpected pos 576
# vs 534" (with "basic_ios::clear: iostream error" as its context).
_IO_FAILURE = re.compile(
    r"failed writing|write failed|i/o error|\bio error|os error \d+|no space left|disk quota|"
    r"unexpected pos|iostream error|read-only file system",
    re.IGNORECASE,
)
_OS_ERROR_CODE = re.compile(r"os error (\d+)|errno (\d+)", re.IGNORECASE)
_ENFORCE_PREFIX = re.compile(r"^\s*\[enforce fail at [^\]]*\]\s*\.?\s*")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_NEARLY_FULL_BYTES = 1 << 20


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or during, each once."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _safetensors_error() -> type[BaseException] | None:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return None
    return SafetensorError


def _is_io_failure(error: BaseException) -> bool:
    """An OSError anywhere in the chain, or safetensors/torch saying in words that writing failed."""
    library_errors = tuple(t for t in (RuntimeError, _safetensors_error()) if t is not None)
    for link in _chain(error):
        if isinstance(link, OSError):
            return True
        if isinstance(link, library_errors) and _IO_FAILURE.search(str(link)):
            return True
    return False


def _errno_of(error: BaseException) -> int | None:
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno:
            return link.errno
        match = _OS_ERROR_CODE.search(str(link))
        if match:
            return int(match.group(1) or match.group(2))
    text = " ".join(str(link) for link in _chain(error)).lower()
    if "no space left" in text:
        return errno.ENOSPC
    if "disk quota" in text:
        return errno.EDQUOT
    return None


def _nearly_full(folder: Path) -> bool:
    try:
        usage = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return usage.f_bavail * usage.f_frsize < _NEARLY_FULL_BYTES


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(_ENFORCE_PREFIX.sub("", text).split()).rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _failure_sentence(error: BaseException, path: Path, what: str) -> str:
    """One sentence: which file, why (e.g. "No space left on device") and what to do."""
    code = _errno_of(error)
    if code is None and _nearly_full(path.parent):
        code = errno.ENOSPC
    cause = os.strerror(code) if code is not None else _one_line(str(error) or type(error).__name__)
    if code in _FULL:
        remedy = "free some space there or choose a location with enough free space"
    elif code in _DENIED:
        remedy = "choose a location you can write to"
    else:
        remedy = "choose a writable location with enough free space"
    return f"Cannot write {what} to {path} ({cause}); {remedy}."


def _pid_of_temporary(name: str, prefix: str) -> int | None:
    if not (name.startswith(prefix) and name.endswith(".tmp")):
        return None
    middle = name[len(prefix) : -len(".tmp")]
    return int(middle) if middle.isdigit() else None


def _process_is_gone(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the process exists but belongs to someone else
        return False
    return False


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the ``.NAME.<pid>.tmp`` files that killed writers of ``path`` left; never a live one's."""
    prefix = f".{path.name}."
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        pid = _pid_of_temporary(sibling.name, prefix)
        if pid is None or pid == os.getpid() or not _process_is_gone(pid):
            continue
        try:
            if sibling.is_file() and not sibling.is_symlink():
                sibling.unlink()
        except OSError:
            pass


def _current_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, then put it back
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The destination's permission bits when it exists, else what ``open(path, "w")`` would give."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_current_umask()


def _remove(temporary: Path) -> None:
    try:
        if temporary.is_file() or temporary.is_symlink():
            temporary.unlink()
    except OSError:
        pass


def _not_a_folder(target: Path) -> Path | None:
    """The nearest existing ancestor of ``target`` when it is not a folder (so nothing can go under it)."""
    for ancestor in target.parents:
        if ancestor.exists():
            return None if ancestor.is_dir() else ancestor
    return None


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    *,
    what: str = "the checkpoint",
    error_type: type[RepVGGError] = CheckpointError,
) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place.

    An interrupted or failed write never leaves a damaged file where a good one was, nor its temporary
    file; temporary files of killed writers of the same ``path`` are removed. The result keeps the
    permission bits of the file it replaces (a new file gets ``0666 & ~umask``). An I/O failure (full
    disk, no permission, ...) is reported as one sentence naming ``what`` was being written; any other
    exception from ``write`` is re-raised as it is.
    """
    path = Path(path)
    blocker = _not_a_folder(path)
    if blocker is not None:
        raise error_type(
            f"Cannot write {what} to {path}: {blocker} is a file, not a folder; choose another output path."
        )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        mode = _mode_for(path)
        write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException as error:
        # Decide before removing the temporary file: a full disk has space again once it is gone.
        known = isinstance(error, Exception) and not isinstance(error, RepVGGError) and _is_io_failure(error)
        sentence = _failure_sentence(error, path, what) if known else None
        if sentence is not None:
            # torch.save's writer keeps the (removed) temporary file open from its frames, holding on to
            # the disk space while the exception lives: let it go.
            for link in _chain(error):
                traceback.clear_frames(link.__traceback__)
        _remove(temporary)
        if sentence is None:
            raise
        raise error_type(sentence) from error


def writable_or_raise(path: PathLike, error_type: type[RepVGGError] = CheckpointError) -> None:
    """Refuse early, before any slow work, an output path that cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise error_type(f"{target} is a folder; give a file name to write to.")
    blocker = _not_a_folder(target)
    if blocker is not None:
        raise error_type(f"Cannot write to {target}: {blocker} is a file, not a folder; choose another path.")
    if target.exists() and not os.access(target, os.W_OK):
        raise error_type(f"{target} is read-only; make it writable (chmod u+w) or choose another path.")
    existing = next(folder for folder in (target.parent, *target.parent.parents) if folder.exists())
    try:  # the folders still to make are made by the writer: a refused command leaves none behind
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise error_type(
            f"Cannot write to {existing} ({error.strerror or error}); choose a folder you can write to."
        ) from error


def refuse_same_file(source: PathLike, output: PathLike, error_type: type[RepVGGError]) -> None:
    """Refuse an ``output`` that is ``source`` itself (same path, a symlink to it, or a hard link)."""
    source_path, output_path = Path(source), Path(output)
    same = source_path.resolve() == output_path.resolve()
    if not same and source_path.exists() and output_path.exists():
        try:
            same = os.path.samefile(source_path, output_path)
        except OSError:
            same = False
    if same:
        raise error_type(
            f"The output {output} is the input {source}, so writing it would replace the file it reads; "
            "choose another output path."
        )


def output_folder(path: PathLike, error_type: type[RepVGGError] = CheckpointError) -> Path:
    """An output folder, created if needed; a path that is a file, or a folder that cannot be written, is
    refused early with one sentence (before any slow work)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise error_type(f"The output {folder} is a file; give a folder.")
    writable_or_raise(folder / ".write-test", error_type)
    return folder


LOCK_FILE = ".repvgg.lock"


@contextmanager
def folder_lock(
    folder: PathLike, what: str, error_type: type[RepVGGError] = CheckpointError
) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) while one process writes ``what`` there.

    A second process asking for the same folder is refused at once in one sentence naming the holder. The
    lock is the kernel's (``flock`` on ``folder/.repvgg.lock``), so it ends with its process however that
    ends (SIGKILL included): the lock file a dead process left behind blocks nobody. The folders this call
    created are removed again on the way out when nothing but the lock file was put in them (a refused
    run leaves no empty folder behind).
    """
    import fcntl

    created = [f for f in (Path(folder), *Path(folder).parents) if not f.exists()]  # deepest first
    path = output_folder(folder, error_type)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    handle = lock.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise error_type(
                f"{path} is being written by {holder}; wait for it to end, or choose another `output` "
                f"for {what}."
            ) from None
        handle.seek(0)
        handle.truncate()
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv and sys.argv[0] else "python"
        handle.write(f"process {os.getpid()} ({command})")
        handle.flush()
        yield path
    finally:
        if created and {p.name for p in path.iterdir()} == {LOCK_FILE}:
            lock.unlink(missing_ok=True)
            for made in created:  # the folders made for this, while nothing else went into them
                try:
                    made.rmdir()
                except OSError:
                    break
        handle.close()
