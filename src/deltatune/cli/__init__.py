"""The ``deltatune`` command (entry point ``deltatune.cli:main``): the app in ``cli/main.py``, the
commands in ``cli/*_cmd(s).py``, their shared options in ``cli/options.py``."""
from .main import app, main

__all__ = ["app", "main"]
