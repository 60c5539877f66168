"""Training data: reading tables and datasets (``examples.py``, ``sources.py``), chat formats and their encoding, the reference text for forgetting."""
