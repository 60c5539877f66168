"""Loading a checkpoint straight into quantized storage, one module at a time.

    config ──► model skeleton, parameters on the meta device (no memory; buffers real)
    weights ──► per module: read its tensors ──► quantize (targets) or keep float ──► next module
    peak ≈ quantized model + one float layer, instead of the whole float model + its quantized copy

Sources: a transformers directory with safetensors weights (each tensor read on its own, so no
mapping of the whole file stays resident), or a GGUF file (``gguf.GGUFReader``, memory-mapped):
each GGUF tensor is dequantized alone (SmolLM2's Q4_1: 32-weight blocks of fp16 scale + fp16 min
+ 4-bit codes) and immediately re-quantized, so the float model never exists.  Names and the
q/k rotary permutation of llama.cpp are undone with transformers' GGUF helpers.  This re-rounds
the GGUF's 4-bit values onto the NF4/int8 grid (a second rounding; see docs/benchmarks.md).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from ..core import model_state
from ..core.delta import DeltaError, get_submodule_clean
from ..core.layer_types import conv1d_type
from ..core.procmem import cap_heap_cache, release_to_os
from ..core.targets import HEAD_NAMES
from . import layers as Q

Thunk = Callable[[], torch.Tensor]
_CLOSE = "\0close"  # thunks entry that releases the source's files once every tensor is read


class _Shards:
    """One safetensors shard open at a time.  ``get_tensor`` returns a view of the file's memory
    map (file pages, no copy): a weight about to be quantized is read straight from the mapping
    and dropped, and the mapping goes when its last view does.  Kept float tensors are copied
    out by the loader, so nothing of the checkpoint stays mapped after loading (transformers'
    own fp32 load keeps the whole file mapped as the model's weights)."""

    def __init__(self):
        self.path, self.handle = None, None

    def read(self, f: Path, k: str) -> torch.Tensor:
        if self.path != f:
            self.close()
            self.handle = safe_open(str(f), "pt").__enter__()
            self.path = f
        return self.handle.get_tensor(k)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.__exit__(None, None, None)
        self.path, self.handle = None, None


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / s for s in shards]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    found = sorted(p.name for p in d.iterdir())[:10]
    raise DeltaError(f"{d}: no *.safetensors weights to stream (found {found}); for .bin checkpoints "
                     "load the float model and call dt.quantize(model, ...) instead")


def _skeleton(config, model_cls, dtype: torch.dtype, where: str) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    if model_cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else transformers.AutoModelForCausalLM
        if model_cls is None:
            raise DeltaError(f"{where}: config names architecture {arch!r}, which this transformers lacks; "
                             "pass model_cls=... (e.g. transformers.AutoModelForCausalLM)")
    with init_empty_weights(include_buffers=False):
        if hasattr(model_cls, "from_config"):  # Auto* classes
            model = model_cls.from_config(config, dtype=dtype)
        else:
            model = model_cls._from_config(config, dtype=dtype)
    return model.eval()


def _safetensors_source(d: Path, model_cls, dtype) -> tuple[nn.Module, dict[str, Thunk], list[str]]:
    import transformers

    if not (d / "config.json").exists():
        raise DeltaError(f"{d}: no config.json; load_quantized needs a transformers model directory or a .gguf file")
    model = _skeleton(transformers.AutoConfig.from_pretrained(str(d)), model_cls, dtype, str(d))
    expected = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""

    shards = _Shards()

    thunks: dict[str, Thunk] = {}
    unexpected = []
    for f in _weight_files(d):
        with safe_open(str(f), "pt") as h:
            names = list(h.keys())
        for k in names:
            key = k
            if key not in expected and f"{prefix}.{key}" in expected:
                key = f"{prefix}.{key}"  # checkpoint of the bare base model
            elif key not in expected and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
                key = key[len(prefix) + 1:]
            if key in expected:
                thunks[key] = lambda f=f, k=k: shards.read(f, k)
            else:
                unexpected.append(k)
    thunks[_CLOSE] = shards.close
    return model, thunks, unexpected


def _gguf_source(f: Path, model_cls, dtype) -> tuple[nn.Module, dict[str, Thunk], list[str]]:
    import numpy as np
    import transformers
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint, read_field)

    config = transformers.AutoConfig.from_pretrained(str(f.parent), gguf_file=f.name)
    model = _skeleton(config, model_cls, dtype, str(f))
    parsed = load_gguf_checkpoint(str(f), return_tensors=False)  # metadata only
    reader = GGUFReader(str(f))  # memory-mapped: tensors stay 4-bit on disk until read
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(model, processor)

    def read(t) -> torch.Tensor:
        res = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                tensor_key_mapping=names, parsed_parameters=parsed)
        return torch.from_numpy(np.ascontiguousarray(res.weights, dtype=np.float32))

    thunks: dict[str, Thunk] = {}
    unexpected = []
    for t in reader.tensors:
        if t.name in names:
            thunks[names[t.name]] = lambda t=t: read(t)
        else:
            unexpected.append(t.name)
    return model, thunks, unexpected


def _fill(model: nn.Module, thunks: dict[str, Thunk], quant_paths: set[str], cls, opts: dict, dtype: torch.dtype,
          where: Path, release: bool) -> None:
    """Read, quantize (or copy) and place each module's tensors, one module at a time."""
    by_module: dict[str, list[str]] = {}
    for key in thunks:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    conv1d = conv1d_type()
    for mod_path, keys in by_module.items():  # one module's tensors in memory at a time
        tensors = {k: thunks[k]() for k in keys}
        if mod_path in quant_paths:
            old = get_submodule_clean(model, mod_path)
            w, b = tensors.pop(f"{mod_path}.weight", None), tensors.pop(f"{mod_path}.bias", None)
            if w is None:
                raise DeltaError(f"{where}: no weight for {mod_path!r} in the checkpoint")
            k = Q._variant(cls) if conv1d is not None and isinstance(old, conv1d) else cls
            q = k(w.to(dtype), None if b is None else b.to(dtype), mod_path, **opts).train(False)
            parent_path, _, child = mod_path.rpartition(".")
            (get_submodule_clean(model, parent_path) if parent_path else model)._modules[child] = q
            del w, b, q
        for key, t in tensors.items():
            # copied out of the checkpoint's memory map (get_tensor returns a view of it), so the
            # file is unmapped when loading ends and the copy is where the weight lives
            t = t.to(dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
            set_module_tensor_to_device(model, key, "cpu", value=t)
        del tensors
        if release and mod_path in quant_paths:
            # the quantizer's float temporaries sit in glibc's heap after being freed: hand them
            # back so the next layer's transient does not stack on this one's
            release_to_os()


def load_quantized(path, scheme: str = "nf4", *, model_cls=None, targets=None, skip=HEAD_NAMES,
                   double_quant: bool = True, block_size: int = 64, dtype: torch.dtype = torch.float32,
                   release: bool = True) -> nn.Module:
    """A transformers model from ``path`` (a directory with config.json and safetensors weights, or
    a .gguf file) whose linear layers are quantized to ``scheme`` while loading, never holding the
    whole float model.  ``targets``/``skip``/``double_quant``/``block_size`` as in ``dt.quantize``.
    ``release`` (default) returns the loader's freed scratch memory to the OS after each layer
    and fixes glibc's mmap threshold (``procmem.cap_heap_cache``) so that training's per-step
    dequantized weights go back to the OS too: the point of a quantized base is a small process."""
    d = Path(path).expanduser()
    if release:
        cap_heap_cache()
    cls = Q._scheme(scheme)
    opts = Q._options(scheme, double_quant, block_size)
    if scheme == "nf4":
        Q._bnb()
    if d.is_file() and d.suffix == ".gguf":
        model, thunks, unexpected = _gguf_source(d, model_cls, dtype)
    elif d.is_dir():
        model, thunks, unexpected = _safetensors_source(d, model_cls, dtype)
    else:
        raise DeltaError(f"{d}: not a directory or .gguf file; pass a transformers model directory "
                         "with safetensors weights or a GGUF file")
    close = thunks.pop(_CLOSE, None)
    try:
        _fill(model, thunks, set(Q.plan(model, targets, skip)), cls, opts, dtype, d, release)
    finally:
        if close is not None:
            close()
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
    model_state.put(model, model_state.QUANT, {"scheme": scheme, **opts})
    if release:
        release_to_os()
    return model


SCHEMES = ("nf4", "int8")
QUANT_TASKS = ("causal-lm",)  # a classifier's fresh head is not in the checkpoint to stream from


def base_mismatch(recorded: dict | None, scheme: str | None) -> str | None:
    """One line when an adapter trained on a 4-bit base is used on a float base or the reverse
    (the adapter learnt to correct that base's rounding), else None."""
    trained = (recorded or {}).get("scheme")
    if trained == scheme or (trained is None and scheme is None):
        return None
    was = f"a {trained} base" if trained else "a float base"
    now = f"a {scheme} base" if scheme else "a float base"
    fix = f"pass --quantize {trained}" if trained else "drop --quantize"
    return f"adapter was trained on {was} and is evaluated on {now}; metrics may differ from training ({fix} to match)"
