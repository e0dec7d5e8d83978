"""The package's layers import one way: every import of every module (function-level imports
included) goes to a layer at or below its own, and the import graph has no cycle.

core (pure tensor functions) -> config -> nn (quantized modules) -> transforms -> deploy /
analysis -> zoo -> cli and the package root. ``errors``, ``io`` and ``runtime`` are utilities
below everything; ``tflite_format`` (the .tflite flatbuffer reader and writer) sits just above
``core``, whose INT4 packing it shares. ``deploy`` and ``analysis`` stand side by side and
import neither each other nor anything above them; nothing below ``zoo`` names a zoo module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "omse"

RANK = {
    "errors": 0,
    "io": 1,
    "tflite_format": 2.5,  # above core (its INT4 packing), below config
    "runtime": 1,
    "distributed": 1,
    "core": 2,
    "config": 3,
    "nn": 4,
    "transforms": 5,
    "deploy": 6,
    "analysis": 6,
    "zoo": 7,
    "cli": 8,
    "__init__": 9,
    "__main__": 9,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself
        return "__init__"
    return parts[1]


def _imports(path: Path) -> set[str]:
    """Every omse module ``path`` imports, anywhere in the file."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "omse"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "omse":
                continue
            if node.module is None or node.level and not node.module:
                out |= {f"{target}.{a.name}" for a in node.names}
            else:
                out.add(target)
    return out


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(name: str) -> str:
    """A module name, or the package/module that defines an imported attribute."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


GRAPH = {m: {_resolve(i) for i in _imports(p)} - {m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    unknown = sorted(m for m in MODULES if _layer(m) not in RANK)
    assert not unknown, f"modules outside the layer table: {unknown}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_layers(module):
    here = _layer(module)
    bad = []
    for dep in sorted(GRAPH[module]):
        there = _layer(dep)
        if RANK[there] > RANK[here] or (RANK[there] == RANK[here] and there != here):
            bad.append(f"{dep} ({there})")
    assert not bad, f"{module} ({here}) imports against the layer order: {bad}"


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in GRAPH.get(m, ()):
            if d == "omse" or d not in MODULES:
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m != "omse" and m not in state:
            visit(m)


def test_the_zoo_is_imported_by_nothing_below_it():
    below = [m for m in MODULES if RANK[_layer(m)] < RANK["zoo"]]
    offenders = {m: sorted(d for d in GRAPH[m] if _layer(d) == "zoo") for m in below}
    assert not {m: d for m, d in offenders.items() if d}
