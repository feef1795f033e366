"""The package's layers: each module imports only from its own layer and the layers above it (README,
"Architecture"), no module imports itself in a circle, and only the command line knows its flags."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "repvgg"

# Module prefix -> layer. ``repvgg`` itself (lazy exports) is layer 0 as an exact name only.
LAYERS: dict[str, int] = {
    "repvgg": 0,
    "repvgg.exceptions": 0,
    "repvgg.core": 1,
    "repvgg.io": 2,
    "repvgg.runtime": 3,
    "repvgg.engine": 4,
    "repvgg.studies": 5,
    "repvgg.cli": 6,
    "repvgg.__main__": 6,  # `python -m repvgg`: runs the command line
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def layer_of(module: str) -> int | None:
    """The layer of a module (by its longest listed prefix), or None when it has not been placed."""
    if module in LAYERS:
        return LAYERS[module]
    prefixes = [p for p in LAYERS if p != "repvgg" and module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def modules(root: Path) -> dict[str, Path]:
    """Every module under the package directory ``root``, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, skip_type_checking: bool) -> list[ast.AST]:
    """Every node below ``node`` (function bodies included), optionally without `if TYPE_CHECKING:` bodies."""
    nodes = []
    for child in ast.iter_child_nodes(node):
        if skip_type_checking and _is_type_checking(child):
            nodes.extend(_walk(ast.Module(body=child.orelse, type_ignores=[]), skip_type_checking))
            continue
        nodes.append(child)
        nodes.extend(_walk(child, skip_type_checking))
    return nodes


def imports(root: Path) -> dict[str, list[tuple[int, str]]]:
    """For each module, the package modules it imports: (line, module). ``from pkg import name`` counts as
    ``pkg.name`` when that is a module, and ``from repvgg import name`` as the module that exports ``name``
    lazily, so the top-level package is no way round the layers."""
    known = modules(root)
    package = root.name
    lazy = _lazy_exports(known.get(package))
    found: dict[str, list[tuple[int, str]]] = {}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = []
        for node in _walk(tree, skip_type_checking=module == package):
            if isinstance(node, ast.Import):
                targets += [(node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target not in known:
                        target = lazy.get(alias.name, base) if base == package else base
                    targets.append((node.lineno, target))
        found[module] = [(line, t) for line, t in targets if t == package or t.startswith(package + ".")]
    return found


def _lazy_exports(init: Path | None) -> dict[str, str]:
    """Name -> module from the ``_EXPORTS`` table of the package's ``__init__.py``."""
    if init is None:
        return {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            table = ast.literal_eval(node.value)
            return {name: module for module, names in table.items() for name in names}
    return {}


def upward_imports(root: Path) -> list[str]:
    """Every import of a module from a higher layer, as 'src/repvgg/x/y.py imports repvgg.z (layer N > M)'."""
    known, report = modules(root), []
    for module, targets in imports(root).items():
        own = layer_of(module)
        for _, target in targets:
            layer = layer_of(target)
            if own is not None and layer is not None and layer > own:
                shown = known[module].relative_to(root.parents[1]).as_posix()
                report.append(f"{shown} imports {target} (layer {layer} > {own})")
    return sorted(set(report))


def import_cycle(root: Path) -> list[str] | None:
    """One cycle among the package's modules, as [a, b, ..., a], or None when the imports form a DAG."""
    known = modules(root)
    graph = {m: sorted({t for _, t in ts if t in known and t != m}) for m, ts in imports(root).items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in graph:
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_every_module_has_a_layer() -> None:
    unplaced = [f"{m} ({p})" for m, p in modules(ROOT).items() if layer_of(m) is None]
    assert not unplaced, f"modules not assigned to a layer (add them to LAYERS deliberately): {unplaced}"


def test_no_module_imports_from_a_higher_layer() -> None:
    report = upward_imports(ROOT)
    assert not report, "upward imports:\n" + "\n".join(report)


def test_no_import_cycle() -> None:
    cycle = import_cycle(ROOT)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    root = tmp_path / "src" / "repvgg"
    for name, text in {
        "__init__.py": (
            "from typing import TYPE_CHECKING\n_EXPORTS = {'repvgg.studies.bench': ('run',)}\n"
            "if TYPE_CHECKING:\n    from repvgg.studies.bench import run\n"
        ),
        "core/__init__.py": "",
        "core/blocks.py": "def f():\n    from repvgg.studies import bench\n",
        "core/fusion.py": "from repvgg import run\n",
        "studies/__init__.py": "",
        "studies/bench.py": "from ..core import blocks\n",
        "stray.py": "",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert upward_imports(root) == [
        "src/repvgg/core/blocks.py imports repvgg.studies.bench (layer 5 > 1)",
        "src/repvgg/core/fusion.py imports repvgg.studies.bench (layer 5 > 1)",  # through a lazy export
    ]
    cycle = import_cycle(root)
    assert cycle is not None and set(cycle) == {"repvgg.core.blocks", "repvgg.studies.bench"}
    assert [m for m in modules(root) if layer_of(m) is None] == ["repvgg.stray"]


def test_prediction_does_not_import_the_training_engine() -> None:
    code = (
        "import sys, repvgg.runtime.predict, repvgg.runtime.optimize, repvgg.runtime.export; "
        "print(sorted(m for m in sys.modules if m.startswith('repvgg.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = [m for m in ast.literal_eval(result.stdout.strip().splitlines()[-1]) if layer_of(m) in (4, 5, 6)]
    assert not loaded, f"importing the runtime loaded higher layers: {loaded}"


def test_only_the_cli_knows_flags() -> None:
    """Library code says what is wrong in its own terms; the command line maps that onto its flags."""
    offenders: set[tuple[str, int, str]] = set()
    for module, path in modules(ROOT).items():
        if module == "repvgg.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and FLAG.search(node.value):
                shown = path.relative_to(ROOT.parents[1]).as_posix()
                offenders.add((shown, node.lineno, ", ".join(sorted(set(FLAG.findall(node.value))))))
    assert not offenders, "command-line flags outside cli.py:\n" + "\n".join(
        f"{path}:{line}: {flags}" for path, line, flags in sorted(offenders)
    )
