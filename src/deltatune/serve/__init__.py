"""The HTTP server (``deltatune serve``): routes (``app.py``), the batching engine (``engine.py``),
the OpenAI-compatible routes and schemas (``openai.py``, ``openai_schemas.py``) and streaming
(``stream.py``).  ``deltatune.serve.build_app`` / ``run`` are documented, so they are re-exported here.
"""
from .app import *  # noqa: F401,F403
from .app import __all__  # noqa: F401
