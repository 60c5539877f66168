"""The method × options specs driving the shared invariant matrix (test_invariants.py).

Each ``tests/spec_*.py`` file defines ``SPECS`` (name -> (method, options, {model: extra
options or None to skip that model})) and optionally ``SKIP`` (spec -> set of invariant names to
skip, with a comment saying why).  They are merged here, so every method's author adds one file and
every invariant then covers the method."""
import importlib
import pathlib

SPECS: dict[str, tuple[str, dict, dict]] = {}
SKIP: dict[str, set[str]] = {}

for _f in sorted(pathlib.Path(__file__).parent.glob("spec_*.py")):
    _mod = importlib.import_module(_f.stem)
    SPECS.update(_mod.SPECS)
    SKIP.update(getattr(_mod, "SKIP", {}))
