"""The ``deltatune`` command (entry point ``deltatune.cli:main``); commands live in ``cli/main.py``."""
from .main import app, main

__all__ = ["app", "main"]
