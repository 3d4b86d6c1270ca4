"""The layers of ARCHITECTURE.md, read from the code: every import points down, and the core does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: contracts -> core -> workers -> driver -> command line.
LAYERS = ("schemas", "pipeline.core", "workers", "pipeline", "pipeline.cli")
CORE_MAY_IMPORT = {"numpy", "dataclasses", "typing", "math", "sys", "__future__", "collections", "itertools", "functools"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int | None:
    best = None
    for i, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            best = i if best is None or len(name) > len(LAYERS[best]) else best
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, at any depth of its code (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if _layer(node.module) is not None:  # `from pipeline import report`: the submodule is the target
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                          if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists()]
    return found


SOURCES = sorted(p for folder in ("schemas", "pipeline", "workers") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    here = _layer(_module(path))
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for line, name in _imports(path)
        if (there := _layer(name)) is not None and there > here and name != "pipeline"  # `pipeline`: __version__ only
    ]
    assert not upward, upward


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline" / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_engine_or_io(path: Path) -> None:
    foreign = [
        f"{path.name}:{line} imports {name}"
        for line, name in _imports(path)
        if _layer(name) not in (0, 1) and name.split(".")[0] not in CORE_MAY_IMPORT
    ]
    assert not foreign, foreign
