"""Saving and loading adapters (``adapter.py``: the on-disk format, peft-compatible) and the README written beside them (``model_card.py``)."""
