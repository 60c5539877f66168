"""Loading a checkpoint straight into quantized storage, one module at a time.

    config.json ──► model skeleton, parameters on the meta device (no memory; buffers real)
    *.safetensors ──► per module: open, read its tensors, close ──► quantize (targets) or keep float
    peak ≈ quantized model + one float layer, instead of the whole float model + its quantized copy

Used as ``dt.load_quantized(dir, "nf4")``.  GGUF files (already 4-bit, e.g. SmolLM2's Q4_1) are
not streamed: llama.cpp's block formats (Q4_1: a 32-weight block = fp16 scale + fp16 min + 4-bit
codes) differ from NF4 and transformers' reader dequantizes the whole file at once; convert them
once with ``deltatune.models.gguf_to_fp32`` and stream that directory (see docs/benchmarks.md).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .core import DeltaError, get_submodule_clean
from .targets import HEAD_NAMES


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / s for s in shards]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    found = sorted(p.name for p in d.iterdir())[:10]
    raise DeltaError(f"{d}: no *.safetensors weights to stream (found {found}); for .bin/.gguf checkpoints "
                     "load the float model and call dt.quantize(model, ...) instead")


def _skeleton(d: Path, model_cls, dtype: torch.dtype) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    if not (d / "config.json").exists():
        raise DeltaError(f"{d}: no config.json; load_quantized needs a transformers model directory")
    config = transformers.AutoConfig.from_pretrained(str(d))  # never trust_remote_code here
    if model_cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        if model_cls is None:
            raise DeltaError(f"{d}: config names architecture {arch!r}, which this transformers lacks; "
                             "pass model_cls=... (e.g. transformers.AutoModelForCausalLM)")
    with init_empty_weights(include_buffers=False):
        if hasattr(model_cls, "from_config"):  # Auto* classes
            model = model_cls.from_config(config, dtype=dtype)
        else:
            model = model_cls._from_config(config, dtype=dtype)
    return model.eval()


def load_quantized(path, scheme: str = "nf4", *, model_cls=None, targets=None, skip=HEAD_NAMES,
                   double_quant: bool = True, block_size: int = 64, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model from ``path`` (a directory with config.json and safetensors weights)
    whose linear layers are quantized to ``scheme`` while loading, never holding the whole float
    model.  ``targets``/``skip``/``double_quant``/``block_size`` as in ``dt.quantize``."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    from . import quant as Q

    d = Path(path).expanduser()
    if d.is_file() and d.suffix == ".gguf":
        raise DeltaError(f"{d}: GGUF files cannot be streamed into {scheme}; convert once with "
                         "deltatune.models.gguf_to_fp32(path) and pass the resulting directory")
    if not d.is_dir():
        raise DeltaError(f"{d}: not a directory; pass a transformers model directory with safetensors weights")
    cls = Q._scheme(scheme)
    opts = Q._options(scheme, double_quant, block_size)
    if scheme == "nf4":
        Q._bnb()
    model = _skeleton(d, model_cls, dtype)
    quant_paths = set(Q.plan(model, targets, skip))
    expected = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""

    # group the checkpoint's keys by the module that owns them, remembering their file
    owner: dict[str, list[tuple[str, str, Path]]] = {}
    unexpected: list[str] = []
    for f in _weight_files(d):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                key = k
                if key not in expected and f"{prefix}.{key}" in expected:
                    key = f"{prefix}.{key}"  # checkpoint of the bare base model
                elif key not in expected and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
                    key = key[len(prefix) + 1:]
                if key not in expected:
                    unexpected.append(k)
                    continue
                mod, _, _ = key.rpartition(".")
                owner.setdefault(mod, []).append((key, k, f))
    loaded: set[str] = set()
    for mod_path, items in owner.items():
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key, k, f in items:
            by_file.setdefault(f, []).append((key, k))
        tensors: dict[str, torch.Tensor] = {}
        for f, keys in by_file.items():
            with safe_open(str(f), "pt") as h:  # reopened per module: the mapping is released after
                for key, k in keys:
                    tensors[key] = h.get_tensor(k)
        if mod_path in quant_paths:
            old = get_submodule_clean(model, mod_path)
            w, b = tensors.pop(f"{mod_path}.weight", None), tensors.pop(f"{mod_path}.bias", None)
            if w is None:
                raise DeltaError(f"{d}: no weight for {mod_path!r} in the checkpoint")
            k = Q._variant(cls) if Q._conv1d_class() is not None and isinstance(old, Q._conv1d_class()) else cls
            q = k(w.to(dtype), None if b is None else b.to(dtype), mod_path, **opts).train(False)
            parent_path, _, child = mod_path.rpartition(".")
            (get_submodule_clean(model, parent_path) if parent_path else model)._modules[child] = q
            loaded.update({f"{mod_path}.weight", f"{mod_path}.bias"})
        for key, t in tensors.items():
            set_module_tensor_to_device(model, key, "cpu", value=t, dtype=dtype if t.is_floating_point() else None)
            loaded.add(key)
        del tensors
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = sorted(n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta)
    if missing:
        raise DeltaError(f"{d}: checkpoint lacks {len(missing)} tensor(s) of {type(model).__name__}, e.g. "
                         f"{missing[:5]}; is it the right model directory?")
    if unexpected:
        warnings.warn(f"load_quantized: ignored {len(unexpected)} checkpoint tensor(s) the model does not have, "
                      f"e.g. {unexpected[:3]}", stacklevel=2)
    for p in model.parameters():
        p.requires_grad_(False)
    model.__dict__["_dt_quant"] = {"scheme": scheme, **opts}
    return model
