"""The layer contract of docs/architecture.md, read from the source (every import, those inside
functions included, since a lazy import is still a dependency):

- ``core`` imports nothing of the package above it (only ``core``, ``errors``, ``_version``);
- the flow stages ``capture``, ``convert`` and ``run`` use each other only through the
  package's face (``from portable_models.run import runtime_info``), never a module inside;
- no package imports the public surface (``api``, ``cli`` …) above it;
- the packages import each other without a cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "portable_models"
PACKAGES = ("core", "contract", "isolation", "capture", "convert", "run", "compare", "diagnosis")
STAGES = ("capture", "convert", "run")
BASE = ("errors", "_version")  # the root modules every layer may use


def _imports() -> list[tuple[str, str, str, int]]:
    """(importing package or root module, imported dotted name, file, line) for every
    import of ``portable_models`` in the package."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "portable_models":
                    names = [f"portable_models.{a.name}" for a in node.names]
                elif node.module.startswith("portable_models."):
                    names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("portable_models.")]
            found += [(owner, name, str(rel), node.lineno) for name in names]
    return found


def _top(dotted: str) -> str:
    return dotted.split(".")[1]


def violations() -> list[str]:
    out = []
    graph: dict[str, set[str]] = defaultdict(set)
    for owner, name, file, line in _imports():
        target = _top(name)
        if owner not in PACKAGES or target == owner:
            continue
        where = f"{file}:{line} imports {name}"
        if owner == "core" and target not in BASE:
            out.append(f"{where}: core imports nothing above it")
        if target not in PACKAGES and target not in BASE:
            out.append(f"{where}: a package never imports the public surface ({target})")
        if owner in STAGES and target in STAGES and name != f"portable_models.{target}":
            out.append(f"{where}: use the face of {target} (portable_models.{target}), not a module inside")
        if target in PACKAGES:
            graph[owner].add(target)
    out += [f"import cycle between packages: {' -> '.join(c)}" for c in _cycles(graph)]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], dict.fromkeys(PACKAGES, 0)

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state[nxt] == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in PACKAGES:
        if state[start] == 0:
            visit(start, [start])
    return cycles


def test_the_layer_contract_holds() -> None:
    assert violations() == []


def test_the_contract_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself can fail: a deliberate upward import (core using the contract) and a
    stage reaching into another's internals are both named."""
    import shutil

    copy = tmp_path / "portable_models"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "core" / "upward.py").write_text("from portable_models.contract.model import Contract\n")
    (copy / "run" / "inside.py").write_text("def f():\n    from portable_models.convert.build import build_target\n")
    monkeypatch.setattr(__import__(__name__), "PKG", copy)
    found = violations()
    assert any("core/upward.py:1 imports portable_models.contract.model: core imports nothing" in v for v in found)
    assert any("run/inside.py:2 imports portable_models.convert.build: use the face of convert" in v for v in found)
    assert any(v.startswith("import cycle") for v in found)  # core -> contract -> core
