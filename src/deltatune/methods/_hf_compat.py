"""How transformers passes caches and positions, across the releases deltatune supports
(feature-detected, never read off a version string).

* The KV cache keyword: ``cache`` in transformers 5.2x (``past_key_values`` deprecated), the
  older name before; head models that forward ``**kwargs`` take the backbone's name.
* "Already decoding?": a KV cache's length; a state-space cache's ``has_previous_state``; an RWKV
  ``state``; 4.x Mamba's state object that exists from the prefill on (its cache_position starts
  at 0 there).
* Whether a model numbers positions by counting unmasked tokens (OPT) or 0..T-1 (Llama).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..core import model_state

# The keyword a transformers model takes its KV cache under: "cache" in today's releases (renamed
# with a deprecation shim), "past_key_values" before.  Read off the forward signature, never off a
# version string; the newer name first, so a model that accepts both gets the one it prefers.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache, or None if it takes none.  A head
    model whose forward only passes ``**kwargs`` on to its backbone (BertForSequenceClassification)
    takes the cache under the backbone's name.  Asked on every decoding step, so answered once per
    class (a signature is fixed by the class; inspect.signature costs tens of microseconds)."""
    cls = type(module)
    if cls in _KWARG_OF:
        return _KWARG_OF[cls]
    params = inspect.signature(module.forward).parameters
    key = next((k for k in CACHE_KWARGS if k in params), None)
    backbone = getattr(module, "base_model", None)
    if key is None and isinstance(backbone, nn.Module) and backbone is not module and \
            any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        key = cache_kwarg(backbone)
    _KWARG_OF[cls] = key
    return key


_KWARG_OF: dict[type, str | None] = {}  # model class -> its cache keyword (cache_kwarg's memo)


def pop_cache(kw: dict):
    """Remove the cache from call kwargs under either name and return it (None if absent)."""
    found = [kw.pop(k, None) for k in CACHE_KWARGS]
    return next((c for c in found if c is not None), None)


# recurrent models (RWKV, older Mamba) carry a state instead of a KV cache: present = decoding
STATE_KWARGS = ("state", "cache_params")


def cached_tokens(past, kw: dict) -> int | None:
    """How many positions the model has already seen: the KV cache's length; None when a
    recurrent state (a state-space cache, or an RWKV ``state``) says "already started" without
    a length; 0 when nothing is cached (a plain forward, or generate's first step)."""
    if past is not None:
        try:
            return past.get_seq_length()
        except (ValueError, StopIteration, AttributeError):  # only linear-attention / state layers
            started = any(any(getattr(lay, "has_previous_state", {}).values()) for lay in getattr(past, "layers", ()))
            return None if started else 0
    if not any(kw.get(k) is not None for k in STATE_KWARGS):
        return 0
    # a state object exists from generate's first step on (transformers 4.x Mamba): there its
    # cache_position starts at 0 on the prefill and beyond 0 afterwards
    cp = kw.get("cache_position")
    return 0 if isinstance(cp, torch.Tensor) and cp.numel() and int(cp.reshape(-1)[0]) == 0 else None


def output_cache(out):
    """The cache a model returned (``out.cache`` today, ``out.past_key_values`` before), or None."""
    if not isinstance(out, dict):
        return None
    return next((out[k] for k in CACHE_KWARGS if out.get(k) is not None), None)




def positions_from_mask(model: nn.Module) -> bool:
    """Does the model number positions by counting unmasked tokens when no position_ids are given
    (OPT, and generate()-style left padding), rather than 0..T-1 (Llama's forward)?  Asked of the
    frozen model once: the last token of [pad, a, b] is at 1 by the first rule and 2 by the other."""
    known = model_state.get(model, model_state.MASK_POSITIONS)
    if known is not None:
        return known
    st = model_state.get(model, model_state.STATE)
    ids = torch.tensor([[3, 4, 5]], device=model.get_input_embeddings().weight.device)
    mask = torch.tensor([[0, 1, 1]], device=ids.device)
    was = st.disabled if st is not None else None
    if st is not None:
        st.disabled = True
    try:
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask)[0][0, -1]
            b = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(3, device=ids.device)[None])[0][0, -1]
    finally:
        if st is not None:
            st.disabled = was
    known = not torch.allclose(a, b, atol=1e-6)
    model_state.put(model, model_state.MASK_POSITIONS, known)
    return known
