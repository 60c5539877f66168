"""``python -m deltatune.cli`` (torchrun launches training this way)."""
from .main import main

main()
