"""The architecture as a test: imports only go down the layers declared in pyproject.toml
(import-linter), no module imports a package module inside a function, and the import graph has
no circles (scripts/import_graph.py prints it).

A function-level import hides a dependency from the reader; when it points up a layer it is a
circle in disguise.  The one exception: cli/ and serve/ may import a part that needs an optional
extra on first use, saying so on the line (``# lazy: <why>``).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402

LAZY_ALLOWED_IN = ("deltatune.cli", "deltatune.serve")


def test_layers_contract_is_kept():
    pytest.importorskip("importlinter")
    # in a child process: import-linter's logging and rich set-up would otherwise stay in this one
    code = "import sys, importlinter.cli as c; sys.exit(c.lint_imports(no_cache=True, no_logo=True))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]  # the contract lives in pyproject.toml


def _declared_lazy(e) -> bool:
    line = import_graph.module_names()[e.src].read_text().splitlines()[e.line - 1]
    return e.src.startswith(LAZY_ALLOWED_IN) and "# lazy:" in line


def test_no_function_level_imports_of_package_modules():
    hidden = sorted(f"{e.src} -> {e.dst} (line {e.line})" for e in import_graph.edges()
                    if e.in_function and not _declared_lazy(e))
    assert not hidden, "import these at the top of the module (or add a hook one layer down):\n" + "\n".join(hidden)


def test_import_graph_has_no_circles():
    assert import_graph.circles([e for e in import_graph.edges() if e.src != "deltatune"]) == []


def test_import_graph_script_runs():
    assert import_graph.main([]) == 0


MAX_FUNCTION_LINES, MAX_FILE_LINES = 80, 500


def _long_parts():
    """(what, lines) of every function over 80 lines and every file over 500 lines in the package;
    a file may stay longer if its first 5 lines give the reason ("# long file: ...")."""
    found = []
    for path in sorted((ROOT / "src" / "deltatune").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT / "src")
        n = text.count("\n")
        if n > MAX_FILE_LINES and "# long file:" not in "\n".join(text.splitlines()[:5]):
            found.append((f"file {rel}", n))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    found.append((f"function {rel}:{node.name}", size))
    return found


def test_no_long_functions_or_files():
    long = _long_parts()
    assert not long, "split along ideas (one concern per function/module):\n" + "\n".join(
        f"{what}: {n} lines" for what, n in long)
