"""Keeping library chatter out of the user's progress display.

During training, torch (dynamo's recompilation notices and tracebacks, inductor), transformers and
datasets log warnings and emit ``warnings.warn`` messages that land in the middle of the tqdm bar.
:func:`library_log` sends all of it to a log file in the run directory instead (``train.log``), and
to stderr as well only when the user asks (``deltatune --verbose`` or ``DELTATUNE_VERBOSE=1``).  deltatune's own messages
(logger ``deltatune``) are untouched.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

from ..models import verbose

# the libraries whose loggers write into a training run's display
LIBRARY_LOGGERS = ("torch", "torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes",
                   "transformers", "datasets", "py.warnings")


@contextlib.contextmanager
def library_log(path: str | os.PathLike | None) -> Iterator[Path | None]:
    """Route library log records and Python warnings to ``path`` (appended) for the duration of the
    block; ``path`` None just silences them unless :func:`verbose`."""
    handler: logging.Handler
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    saved = []
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, list(lg.handlers), lg.propagate, lg.disabled))
        # a library's logging.config.dictConfig (mlflow, alembic) disables every existing logger;
        # inside the block a disabled one would drop its records instead of filing them
        lg.disabled = False
        if verbose():  # the file and the terminal
            lg.addHandler(handler)
            continue
        # torch installs its own stderr handlers on its loggers: replace them, and stop propagation
        # to the root logger (whose handler writes to the terminal)
        lg.handlers, lg.propagate = [handler], False
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each distinct warning once, into the file
        logging.captureWarnings(True)
        try:
            yield Path(path) if path is not None else None
        finally:
            logging.captureWarnings(False)
            for lg, handlers, propagate, disabled in saved:
                lg.handlers, lg.propagate, lg.disabled = handlers, propagate, disabled
            handler.close()
