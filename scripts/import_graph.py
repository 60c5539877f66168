"""Print deltatune's module import graph and its circles.

    python scripts/import_graph.py            # summary + circles
    python scripts/import_graph.py --edges    # also every edge (importer -> imported, [fn] = in a function)

Reads the source with `ast` (nothing is imported), so it sees function-level imports too: those are
the circles that hide, because Python only follows them when the function runs.  An edge points from
a module to each package module it imports; `from . import x` counts as importing `pkg.x` when that
is a module.  Circles are the strongly connected components of more than one module.
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "deltatune"


@dataclass(frozen=True)
class Edge:
    src: str        # importing module, e.g. "deltatune.api"
    dst: str        # imported package module
    in_function: bool
    line: int


def module_names(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative levels resolved against importer)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, importer: str, is_pkg: bool, modules: dict) -> list[str]:
    """Package modules one import statement reaches (the deepest existing module of each name)."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(importer, is_pkg, node)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name != importer and name not in out:
            out.append(name)
    return out


def edges(src: Path = SRC) -> list[Edge]:
    """All import edges between package modules, top-level and function-level."""
    modules = module_names(src)
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        in_fn = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_fn.update(id(n) for n in ast.walk(fn) if n is not fn)
        typing_only = set()  # `if TYPE_CHECKING:` imports never run: not part of the graph
        for block in ast.walk(tree):
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
                typing_only.update(id(n) for stmt in block.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                for dst in _targets(node, name, is_pkg, modules):
                    found.append(Edge(name, dst, id(node) in in_fn, node.lineno))
    return found


def circles(found: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative-safe sizes)."""
    graph: dict[str, set[str]] = {}
    for e in found:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", action="store_true", help="print every edge")
    args = ap.parse_args(argv)
    found = edges()
    modules = module_names()
    fn = [e for e in found if e.in_function]
    # the package root re-exports the public names: its imports are not part of the layering
    comps = circles([e for e in found if e.src != PACKAGE])
    print(f"modules: {len(modules)}  edges: {len(found)}  function-level: {len(fn)}  circles: {len(comps)}")
    if args.edges:
        for e in sorted(found, key=lambda e: (e.src, e.dst, e.line)):
            print(f"  {e.src} -> {e.dst}{'  [fn]' if e.in_function else ''}  (line {e.line})")
    for comp in comps:
        print(f"circle ({len(comp)} modules): " + ", ".join(comp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
