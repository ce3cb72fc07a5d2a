"""The import graph of LANCET's packages, read from the source (function-local imports included).

    python tools/import_graph.py        # prints layering violations and import cycles; exit 1 if any

Local imports count: a cycle hidden inside a function still ties two modules together (and
still fails when one of them is imported alone at the wrong moment). Used by
tests/test_layering.py, so CI enforces it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lancet_core", "tasks", "flows", "lancet_cli")

#: package -> what it must never import (the layering of the brief: library < tasks < flows < CLI).
FORBIDDEN = {
    "lancet_core": ("tasks", "flows", "lancet_cli", "prefect", "mlflow"),
    "tasks": ("flows", "lancet_cli"),
    "flows": ("lancet_cli",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (``from a.b import c`` -> a.b.c if a module, else a.b)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = here.split(".") if is_pkg else here.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if _is_module(full) else base)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotation-only imports never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            g[module_name(path)] = imports_of(path)
    return g


def violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in sorted(g.items()):
        banned = FORBIDDEN.get(mod.split(".")[0], ())
        for dep in sorted(deps):
            if dep.split(".")[0] in banned:
                out.append(f"{mod} imports {dep} ({mod.split('.')[0]} must not import {dep.split('.')[0]})")
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), within our packages."""
    nodes = sorted(g)
    edges = {m: sorted(d for d in g[m] if d in g and d != m and not m.startswith(d + ".")) for m in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    g = graph()
    bad, loops = violations(g), cycles(g)
    for line in bad:
        print("layering:", line)
    for comp in loops:
        print("cycle:", " <-> ".join(comp))
    sys.exit(1 if bad or loops else 0)
