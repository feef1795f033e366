"""The README's Python code runs as written, and its model table matches `repvgg models`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_runs(index: int, tmp_path: Path) -> None:
    code = python_blocks()[index]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


def test_readme_model_table_is_current() -> None:
    import contextlib
    import io

    from repvgg.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(["models", "--format", "markdown"])
    assert buffer.getvalue().strip() in README.read_text()
