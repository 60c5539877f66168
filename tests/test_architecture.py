"""The architecture as a test: imports only go down the layers declared in pyproject.toml
(import-linter), and no module imports a package module inside a function.

A function-level import hides a dependency from the reader and from import-linter's view of the
top of the file; when it points up a layer it is a circle in disguise.  The ones still there are
listed in LAZY_DEBT below: that list may only shrink (a new lazy import fails the test).
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402

# module -> package modules it still imports inside a function (to become top-level or hooks)
LAZY_DEBT = {
    "deltatune.app.evaluate": ['deltatune.api', 'deltatune.core.delta', 'deltatune.data.reference_text'],
    "deltatune.app.importance_report": ['deltatune'],
    "deltatune.app.run": ['deltatune', 'deltatune.app.evaluate', 'deltatune.data.chat_encode',
                          'deltatune.data.examples', 'deltatune.files', 'deltatune.models',
                          'deltatune.storage.model_card', 'deltatune.train.distributed', 'deltatune.train.losses',
                          'deltatune.train.runlock', 'deltatune.train.trainer'],
    "deltatune.app.tools": ['deltatune', 'deltatune.app.evaluate', 'deltatune.app.run', 'deltatune.core.delta',
                            'deltatune.core.targets', 'deltatune.data.examples', 'deltatune.data.reference_text',
                            'deltatune.files', 'deltatune.models', 'deltatune.storage.adapter',
                            'deltatune.storage.model_card'],
    "deltatune.cli.main": ['deltatune.app.demo', 'deltatune.app.importance_report', 'deltatune.app.run',
                           'deltatune.app.tools', 'deltatune.files', 'deltatune.models', 'deltatune.serve.app',
                           'deltatune.storage.adapter', 'deltatune.train.distributed'],
    "deltatune.data.examples": ['deltatune.data.chat_encode', 'deltatune.data.chat_formats', 'deltatune.data.sources'],
    "deltatune.data.sources": ['deltatune.data.examples'],
    "deltatune.serve.app": ['deltatune.api', 'deltatune.models', 'deltatune.storage.adapter'],
    "deltatune.serve.engine": ['deltatune.api', 'deltatune.methods._virtual_tokens', 'deltatune.mixed'],
    "deltatune.storage.model_card": ['deltatune.files'],
    "deltatune.train.trainer": ['deltatune.data.examples', 'deltatune.fast'],
}


def test_layers_contract_is_kept(monkeypatch, capsys):
    lint = pytest.importorskip("importlinter.cli")
    monkeypatch.chdir(ROOT)  # the contract lives in pyproject.toml
    code = lint.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out[-4000:]


def test_no_new_function_level_imports_of_package_modules():
    new = sorted(f"{e.src} -> {e.dst} (line {e.line})" for e in import_graph.edges()
                 if e.in_function and e.dst not in LAZY_DEBT.get(e.src, ()))
    assert not new, "import these at the top of the module (or add a hook one layer down):\n" + "\n".join(new)


def test_top_level_imports_have_no_circles():
    top = [e for e in import_graph.edges() if not e.in_function and e.src != "deltatune"]
    assert import_graph.circles(top) == []


def test_import_graph_script_runs():
    assert import_graph.main([]) == 0
