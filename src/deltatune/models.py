"""Loading base models for the CLI: a local directory, a Hub id (from the local Hugging Face cache;
downloaded only when the user runs with ``HF_HUB_OFFLINE=0``, see :func:`ensure_model`), or a GGUF
file, dequantised once to float32 and cached under ``~/.cache/deltatune/``.  ``trust_remote_code``
stays off unless the user asks.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from .core.delta import DeltaError
from .quant.load import QUANT_TASKS, SCHEMES, load_quantized
from .text import classifier as pooled
from .vision.classifier import is_vision_spec, load_vision_model

AUTO_CLASSES = {
    "classify": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "image-classify": "AutoModelForImageClassification",
}


def cache_root() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if verbose():  # `deltatune --verbose`: transformers' own warnings and bars stay on
        return
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except Exception:
        pass


def verbose() -> bool:
    """``deltatune --verbose`` (or DELTATUNE_VERBOSE=1): libraries' logs and progress bars reach the terminal."""
    return os.environ.get("DELTATUNE_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' own tqdm bars ("Loading weights", "Writing model shards", "Converting and
    de-quantizing GGUF tensors...") off for the block and restored after, unless :func:`verbose`.
    Its GGUF reader calls ``tqdm.auto.tqdm`` directly instead of the switchable ``logging.tqdm``,
    so that module's ``tqdm`` is swapped for a disabled one while the block runs (where it exists)."""
    if verbose():
        yield
        return
    from transformers.utils import logging as tlog

    was_on = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        reader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        reader = None
    bar = getattr(reader, "tqdm", None)
    if bar is not None:
        reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            reader.tqdm = bar
        if was_on:
            tlog.enable_progress_bar()


def gguf_to_fp32(gguf_path: str | Path) -> Path:
    """Dequantise a GGUF file once and cache a float32 transformers directory; return its path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path)
    st = src.stat()
    out = cache_root() / f"{src.stem}-{st.st_size}-fp32"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
            model.hf_quantizer = None  # else transformers refuses to save a "quantized" model
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache is an ordinary directory
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: a crash leaves no half-written cache entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- Hub model ids
# deltatune runs offline by default (the CLI sets HF_HUB_OFFLINE=1 unless the user set it): an id is
# then served from the cache that `hf download org/name` fills, and a missing one is a one-line
# error naming that command.  With HF_HUB_OFFLINE=0 a missing id is downloaded once with
# huggingface_hub.snapshot_download (its progress bars on stderr), limited to the files a
# transformers model needs, so a repository's duplicate .bin / .onnx / .gguf copies are not fetched.

# what from_pretrained reads: config, weights, tokenizer, processor, chat template
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as the user (or the CLI's default) set it, read now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo: str, repo_type: str = "model", patterns: list[str] | None = None) -> str | None:
    """The cached snapshot directory of ``repo``, or None (never the network).  ``patterns`` must be
    those of the download: huggingface_hub >= 1 keeps the repository's file list and calls a
    snapshot without the files we never fetched (the .bin copies) incomplete.  A model snapshot
    counts only with its config.json (a repository that is not a transformers model is not "cached")."""
    if repo_type == "model":
        patterns = patterns or MODEL_FILES
    try:
        d = snapshot_download(repo, repo_type=repo_type, local_files_only=True, allow_patterns=patterns)
    except Exception:  # huggingface_hub raises one of several errors for "not cached"; all mean None
        return None
    return d if repo_type != "model" or os.path.exists(os.path.join(d, "config.json")) else None


def download_snapshot(repo: str, repo_type: str, patterns: list[str], label: str) -> str:
    """``snapshot_download`` of the files matching ``patterns`` into the Hub cache, its progress bars
    on stderr; every failure is one DeltaError line naming ``label`` (model 'org/x', data 'org/x')."""
    fetch = f"`hf download {repo}{' --repo-type dataset' if repo_type == 'dataset' else ''}`"
    was_off = are_progress_bars_disabled()
    enable_progress_bars()  # transformers' / datasets' quiet modes turn the Hub's bars off; a download shows its bar
    try:
        return snapshot_download(repo, repo_type=repo_type, allow_patterns=patterns)
    except RepositoryNotFoundError:  # also what the Hub answers for a private or gated repository without a token
        raise DeltaError(f"{label}: no such {repo_type} repository on the Hub ({hf_constants.ENDPOINT}); check the "
                         "id (a private or gated one needs `hf auth login` first)") from None
    except Exception as e:  # GatedRepoError, HTTP / connection errors ...
        why = " ".join(str(e).split())[:200]
        raise DeltaError(f"{label}: the download failed ({type(e).__name__}: {why}); check the id and the "
                         f"network, or fetch it with {fetch}") from None
    finally:
        if was_off:
            disable_progress_bars()


def ensure_model(repo: str) -> str:
    """The local snapshot directory of Hub model ``repo``: cached, or downloaded when online."""
    d = cached_snapshot(repo)
    if d is not None:
        return d
    if offline():
        raise DeltaError(f"model {repo!r} is not a local directory and not in the local Hugging Face cache "
                         f"(HF_HUB_OFFLINE=1); download it once with `hf download {repo}` (or run with "
                         "HF_HUB_OFFLINE=0 to let deltatune download it), then run again")
    d = download_snapshot(repo, "model", MODEL_FILES, f"model {repo!r}")
    if not os.path.exists(os.path.join(d, "config.json")):
        raise DeltaError(f"model {repo!r}: the Hub repository has no config.json; it is not a transformers model "
                         "(for a GGUF repository, download the .gguf file and pass its path)")
    return d


def resolve(spec: str) -> str:
    """A loadable directory or cached id for ``spec``; GGUF files become a cached fp32 directory."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(gguf_to_fp32(p))
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and ggufs:
            return str(gguf_to_fp32(ggufs[0]))
        if not (p / "config.json").exists():
            raise DeltaError(f"{p}: no config.json (nor a .gguf file); not a transformers model directory")
        return str(p)
    if p.exists():
        raise DeltaError(f"{p}: expected a model directory or a .gguf file")
    if spec.count("/") <= 1 and not spec.startswith((".", "/", "~")):
        ensure_model(spec)  # in the Hub cache now (or a one-line error); transformers finds it there by id
        return spec
    raise DeltaError(f"model directory {spec} does not exist")


def load_tokenizer(path: str, spec: str, trust_remote_code: bool = False, required: bool = True):
    """The tokenizer saved with the model at ``path``.  Missing or unloadable tokenizer files are a
    one-line DeltaError, or, when not ``required`` (a server can take token ids), None and a warning."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                         trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError... depending on what is absent
        why = " ".join(str(e).split())[:200]
        if required:
            raise DeltaError(f"{spec}: no usable tokenizer ({type(e).__name__}: {why}); put the tokenizer files "
                             "(tokenizer.json or vocab files) next to the model") from None
        import logging

        logging.getLogger("deltatune").warning(
            "%s: no usable tokenizer (%s); serving token ids only (send 'input_ids', not 'prompt')", spec, why)
        return None


def load_model(spec: str, task: str, label_names: list[str] | None = None, trust_remote_code: bool = False,
               tokenizer_required: bool = True, weights: str | None = None, image_size: int | None = None,
               log=None):
    """(model, tokenizer or image processor, resolved path) for ``task``.  With
    ``tokenizer_required=False`` a model without tokenizer files loads with tokenizer None.
    ``timm:``/``torchvision:``/``module:factory`` specs go to :mod:`deltatune.vision.classifier`
    (``weights``: a local state dict; ``image_size``: override the model's input size)."""
    import transformers

    quiet_transformers()
    if task not in AUTO_CLASSES:
        raise DeltaError(f"unknown task {task!r}; choose one of {sorted(AUTO_CLASSES)}")
    if is_vision_spec(spec):
        if task != "image-classify":
            raise DeltaError(f"--model {spec} is an image classifier; use --task image-classify")
        return load_vision_model(spec, label_names, weights, image_size, log)
    if weights or image_size:
        raise DeltaError(f"--weights/--image-size are for timm:NAME, torchvision:NAME and module:factory models; "
                         f"{spec} is a transformers model, which loads its own weights and image size")
    path = resolve(spec)
    cls = getattr(transformers, AUTO_CLASSES[task])
    kw: dict = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if label_names is not None:
        kw.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True)
    try:
        model = _load_classifier(path, kw) if task == "classify" else None
        model = model if model is not None else cls.from_pretrained(path, **kw)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise DeltaError(f"{spec}: the model needs custom code from its repository; pass --trust-remote-code "
                             "only if you trust it") from None
        raise DeltaError(f"{spec}: cannot load as {AUTO_CLASSES[task]} ({e})") from None
    except OSError as e:
        raise DeltaError(f"{spec}: cannot load the model ({e})") from None
    proc = None
    if task == "image-classify":
        try:
            proc = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except Exception:
            proc = None  # arrays are fed as they are
    else:
        proc = load_tokenizer(path, spec, trust_remote_code, tokenizer_required)
        if proc is not None and proc.pad_token is None:  # GPT-style tokenizers: pad with EOS (masked out anyway)
            proc.pad_token = proc.eos_token
        if proc is not None and getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = proc.pad_token_id
    return model, proc, path


def _load_classifier(path: str, kw: dict):
    """A sentence-transformers checkpoint (or a full run saved from one) classified through the
    pooling it declares (text/classifier.py); None for every other model."""
    local = path if Path(path).is_dir() else cached_snapshot(path)  # a Hub id: its cached snapshot
    if local is None:
        return None
    d = Path(local)
    if pooled.is_saved(d):
        return pooled.load_saved(d, kw)
    how = pooled.sentence_pooling(d)
    return pooled.load_pooled(path, how, kw) if how is not None else None


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads. ``None`` = all cores, but only 1 when the machine is already
    busy: on an oversubscribed CPU, OpenMP threads spin-wait for each other and 2 threads ran a
    MiniLM training step 4x *slower* than 1 (measured here, load average 15 on 2 cores)."""
    import torch

    if threads is None:
        n = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        threads = 1 if load > n else max(1, n)
    torch.set_num_threads(max(1, threads))
    return threads


def load_quantized_model(spec: str, scheme: str, task: str = "causal-lm", trust_remote_code: bool = False,
                         tokenizer_required: bool = True, calibration=None):
    """``models.load_model``'s contract — (model, tokenizer, resolved path) — with the base streamed
    into ``scheme`` by :func:`load_quantized`: what ``deltatune train|eval|compare|serve --quantize``
    load.  ``spec`` is a model directory, a cached Hub id or a .gguf file (streamed as it is).
    ``calibration``: tokenizer -> batches (``--calibrate N``, app/calibration.py), run through the
    base block by block while it streams, for calibrated NF4 scales."""
    if scheme not in SCHEMES:
        raise DeltaError(f"unknown --quantize {scheme!r}; choose one of {list(SCHEMES)}")
    if task not in QUANT_TASKS:
        raise DeltaError(f"--quantize applies to --task causal-lm (got {task!r}): other tasks add a fresh head "
                         "that is not in the checkpoint; drop --quantize")
    if trust_remote_code:
        raise DeltaError("--quantize streams only architectures that transformers ships; drop "
                         "--trust-remote-code or --quantize")
    quiet_transformers()
    p = Path(spec).expanduser()
    gguf = p if p.is_file() and p.suffix == ".gguf" else None
    if gguf is None and p.is_dir() and not (p / "config.json").exists():
        gguf = next(iter(sorted(p.glob("*.gguf"))), None)
    path = str(gguf) if gguf is not None else resolve(spec)
    if gguf is None and not Path(path).is_dir():  # a cached Hub id: its snapshot directory
        path = ensure_model(path)
    tok = load_tokenizer(str(gguf.parent) if gguf is not None else path, spec, False,
                         tokenizer_required or calibration is not None)
    if tok is not None and tok.pad_token is None:  # as models.load_model: pad with EOS (masked out anyway)
        tok.pad_token = tok.eos_token
    model = load_quantized(path, scheme, calibration=None if calibration is None else calibration(tok))
    if tok is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, path
