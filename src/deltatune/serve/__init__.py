"""The HTTP server (``deltatune serve``): ``app.py`` builds the app from the native routes
(``routes.py``, ``adapters.py``, bodies in ``schemas.py``), the request wrappers (``middleware.py``),
the metrics (``metrics.py``) and the OpenAI-compatible routes (``openai.py``: requests → jobs in
``openai_jobs.py``, SSE and logprobs in ``openai_stream.py``, bodies in ``openai_schemas.py``); the
batching engine (``engine.py``: jobs in ``jobs.py``, static batches in ``static.py``, per-row sampling
in ``sampling.py``, continuous batching in ``batching.py``) and streaming (``stream.py``).
``deltatune.serve.build_app`` / ``run`` are documented, so they are re-exported here.
"""
from .app import *  # noqa: F401,F403
from .app import __all__  # noqa: F401
