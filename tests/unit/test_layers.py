"""The import layering of ``src/harmonylite`` (see docs/architecture.md), read from the source.

Every import counts: at module level, inside functions and under ``TYPE_CHECKING`` alike (a
circle hidden under ``TYPE_CHECKING`` or in a function is still a circle for the reader). A module
may import its own package and the layers below it, never a layer above, and no chain of imports
may lead back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "harmonylite"

# Lowest first. A module belongs to the longest prefix listed; each entry is its own layer, so two
# packages on different lines never import upward (and packages never import sideways upward).
LAYERS: list[tuple[str, ...]] = [
    ("harmonylite", "harmonylite.errors", "harmonylite.aio", "harmonylite.node_ids",
     "harmonylite.redact"),
    ("harmonylite.config",),
    ("harmonylite.ids",),
    ("harmonylite.db",),
    ("harmonylite.bus",),
    ("harmonylite.storage",),
    ("harmonylite.ops",),
    ("harmonylite.cluster",),
    ("harmonylite.cdc",),
    ("harmonylite.replication",),
    ("harmonylite.snapshot",),
    ("harmonylite.archive",),
    ("harmonylite.restore",),
    ("harmonylite.node",),
    ("harmonylite.cli",),
    ("harmonylite.docgen", "harmonylite.contrib", "harmonylite.__main__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The harmonylite modules ``name`` imports, wherever in the file the import is."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # ``from pkg import module`` imports the module
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def test_every_module_has_a_layer() -> None:
    missing = [m for m in _graph() if _layer(m) < 0]
    assert not missing, f"modules in no layer (add them to LAYERS): {missing}"


def test_no_import_goes_up_the_layers() -> None:
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps
                    if _layer(d) > _layer(m))
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)
