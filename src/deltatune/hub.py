"""Hub model ids (``--model org/name``): the local Hugging Face cache first, a download only when the
user is online.

deltatune runs offline by default (the CLI sets ``HF_HUB_OFFLINE=1`` unless the user set it): an id
is then served from the cache that ``hf download org/name`` fills, and a missing one is a one-line
error naming that command.  With ``HF_HUB_OFFLINE=0`` a missing id is downloaded once with
``huggingface_hub.snapshot_download`` (its progress bars on stderr), limited to the files a
transformers model needs, so a repository's duplicate ``.bin`` / ``.onnx`` / ``.gguf`` copies are not fetched.
"""
from __future__ import annotations

import os

from huggingface_hub import snapshot_download
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from .core import DeltaError

# what from_pretrained reads: config, weights, tokenizer, processor, chat template
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as the user (or the CLI's default) set it, read now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo: str) -> str | None:
    """The cached snapshot directory of ``repo`` holding a config.json, or None (never the network)."""
    try:
        d = snapshot_download(repo, local_files_only=True)
    except Exception:  # huggingface_hub raises one of several errors for "not cached"; all mean None
        return None
    return d if os.path.exists(os.path.join(d, "config.json")) else None


def ensure_model(repo: str) -> str:
    """The local snapshot directory of Hub model ``repo``: cached, or downloaded when online."""
    d = cached_snapshot(repo)
    if d is not None:
        return d
    fetch = f"`hf download {repo}`"
    if offline():
        raise DeltaError(f"model {repo!r} is not a local directory and not in the local Hugging Face cache "
                         f"(HF_HUB_OFFLINE=1); download it once with {fetch} (or run with HF_HUB_OFFLINE=0 to let "
                         "deltatune download it), then run again")
    was_off = are_progress_bars_disabled()
    enable_progress_bars()  # transformers' quiet mode turns the Hub's bars off; a download shows its bar
    try:
        d = snapshot_download(repo, allow_patterns=MODEL_FILES)
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, HTTP / connection errors ...
        why = " ".join(str(e).split())[:200]
        raise DeltaError(f"model {repo!r}: the download failed ({type(e).__name__}: {why}); check the id and the "
                         f"network, or fetch it with {fetch}") from None
    finally:
        if was_off:
            disable_progress_bars()
    if not os.path.exists(os.path.join(d, "config.json")):
        raise DeltaError(f"model {repo!r}: the Hub repository has no config.json; it is not a transformers model "
                         "(for a GGUF repository, download the .gguf file and pass its path)")
    return d
