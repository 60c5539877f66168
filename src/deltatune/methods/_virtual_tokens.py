"""Shared machinery of the prompt-learning methods (``prompt``, ``prefix``): virtual tokens that
live at the *model* level, not in a wrapped layer.

How they attach (documented choice): one forward pre-hook with kwargs on the user's top model
(``register_forward_pre_hook(with_kwargs=True)``) rewrites the call before the model sees it:

    model(input_ids, attention_mask, labels, position_ids, cache | past_key_values, ...)
      │  prompt  (P_p tokens): inputs_embeds = [prompt ; embed(input_ids)]        (B, P_p+T, D)
      │                        labels        = [-100 × P_p ; labels]              (causal LM)
      │                        token_type_ids = [0 × P_p ; token_type_ids]
      │  prefix  (P_f tokens): cache          = DynamicCache holding the prefix  (B, H_kv, P_f, d_h)
      │  both:                 attention_mask = [1 × (P_f+P_p) ; attention_mask]
      │                        position_ids   = [P_f + 0..P_p-1 ; position_ids + P_f + P_p]
      ▼
    the unchanged transformers forward

A forward hook only drops the prefix cache from the output when the caller asked for
``use_cache=False`` (Llama returns whatever cache it was given).
The prompt is prepended only when the cache is empty (a plain forward, or the first step of
``generate``); later decoding steps only extend the mask and shift the positions, because the
virtual tokens already sit in the cache.  Wrapping the input-embedding module instead could not
extend the attention mask, the labels or the cache, hence the model-level hook.

Mixed batches (``dt.mixed``): the hook gives each row its own adapter's tokens.  Rows needing the
same counts simply get different embeddings / key-values.  Otherwise (rows of 3 and 2 prompt
tokens, a None or LoRA row, prefix rows next to prompt rows) the short rows are left-padded with
masked slots, like left padding, and given the positions they would have alone:

    row  adapter      cache: prefix slots (F_max=2)   sequence: prompt slots (P_max=3) ; tokens
    0    prompt, P=3  ·  ·                            v0 v1 v2 ; x x x      positions 0 1 2 ; 3..
    1    prompt, P=2  ·  ·                            ·  v0 v1 ; x x x      positions · 0 1 ; 2..
    2    prefix, F=2  k0 k1                           ·  ·  ·  ; x x x      positions · · · ; 2..
    3    None / LoRA  ·  ·                            ·  ·  ·  ; x x x      positions · · · ; 0..
    · = masked slot (attention mask 0, zero embedding or zero key/value, position 0)

Every row's output then equals running it alone (prompt rows: ``y[i, P_max - P_i:]``; a row of
P_i = 0 also drops the loss term of its first token, which alone has no predecessor).
``check_mixed`` admits the padded case only where that holds (causal LMs taking position_ids).

The trainable tensors live in one container module, ``model.deltatune_virtual.deltas[name]``
(mirroring ``DeltaLayer.deltas``), so ``.to()``, ``.parameters()`` and optimizers see them, and
their state-dict keys contain ``.deltas.`` like every other adapter tensor.  As in peft, the
output keeps the virtual positions: ``logits`` is (B, P_p+T, V) for prompt tuning.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from ..core import model_state
from ..core.delta import CopyDelta, DeltaError, PREFIX, iter_delta_layers
from ..core.rows import RowPlan
from ..core.tasks import PEFT_TASK_TYPES, task_of
# cache_kwarg is re-exported: prefix.py and callers reach it as _virtual_tokens.cache_kwarg
from ._hf_compat import (CACHE_KWARGS, cache_kwarg, cached_tokens, output_cache, pop_cache,  # noqa: F401
                         positions_from_mask)

STORE = "deltatune_virtual"  # attribute of the top model holding every prompt/prefix adapter


class Store(nn.Module):
    """Container of the virtual-token adapters of one model: ``deltas[name]`` is a
    ``PromptEmbedding`` or a ``PrefixEncoder``."""

    def __init__(self):
        super().__init__()
        self.deltas = nn.ModuleDict()


# --------------------------------------------------------------------------- model facts

def check_model(model: nn.Module, method: str) -> None:
    """Refuse models the hook cannot drive, with a message saying what is needed."""
    if not callable(getattr(model, "get_input_embeddings", None)) or getattr(model, "config", None) is None:
        raise DeltaError(f"{method}: {type(model).__name__} is not a transformers model with token embeddings "
                         "(needs get_input_embeddings() and an inputs_embeds argument); use lora or adapter instead")
    if getattr(model.config, "is_encoder_decoder", False):
        raise DeltaError(f"{method}: encoder-decoder models ({type(model).__name__}) are not supported yet; "
                         "use a decoder-only or encoder-only model, or peft")
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = None
    main = getattr(model, "main_input_name", "input_ids")
    if not isinstance(emb, nn.Embedding) or main != "input_ids":
        # vision / audio models (ViT, ResNet, ConvNext, CLIP's vision side) embed pixels or
        # features, not token ids: virtual *tokens* have no place to go
        what = (f"takes {main!r}, not token ids" if main != "input_ids" else
                f"has no single token-embedding table to prepend to (get_input_embeddings() gives "
                f"{type(emb).__name__}; multimodal models keep one per tower)")
        raise DeltaError(f"{method}: {type(model).__name__} {what}, so there is no place for virtual tokens; "
                         "use lora, ia3 or adapter instead")


def dims(model: nn.Module) -> dict[str, int | None]:
    """Layer count and attention heads, read as peft reads them, for the metadata of a prompt
    tuning file (None where the config has none: a state-space model such as Mamba has no heads,
    and prompt tuning does not need them)."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return {"heads": getattr(cfg, "num_attention_heads", None), "layers": getattr(cfg, "num_hidden_layers", None)}


def task_type(model: nn.Module) -> str:
    """peft's task_type for ``model`` (the prompt-learning wrapper peft builds depends on it)."""
    return PEFT_TASK_TYPES.get(task_of(model), "FEATURE_EXTRACTION")


def param_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def saved_modules(model: nn.Module, name: str) -> list[str] | None:
    out = sorted(p for p, layer in iter_delta_layers(model)
                 if name in layer.deltas and isinstance(layer.deltas[name], CopyDelta))
    return out or None


def peft_modules_to_save(d: dict[str, Any]):
    """peft lists ["classifier", "score"] for every SEQ_CLS prompt model: let "auto" pick the one
    this model has; other lists are taken as written."""
    mts = d.get("modules_to_save")
    if not mts:
        return None
    if d.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and set(mts) <= {"classifier", "score"}:
        return "auto"
    return list(mts)


# --------------------------------------------------------------------------- init from text

def token_ids(cfg, method: str) -> list[int]:
    """Token ids of ``cfg.init_text`` from ``cfg.tokenizer`` (or a local ``tokenizer_name_or_path``)."""
    tok = cfg.tokenizer
    if tok is None:
        if not cfg.tokenizer_name_or_path:
            raise DeltaError(f"{method}: init_text needs a tokenizer: pass tokenizer=<transformers tokenizer> "
                             "or tokenizer_name_or_path=<local dir>, or give init_token_ids=[...]")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)
    ids = tok(cfg.init_text, add_special_tokens=False)["input_ids"]  # no BOS/CLS inside a prompt
    if not ids:
        raise DeltaError(f"{method}: init_text {cfg.init_text!r} tokenizes to nothing; give a longer text")
    return list(ids)


def with_token_ids(cfg, method: str):
    """The config with ``init_token_ids`` filled from the text, and no tokenizer object: the ids are
    saved with the adapter, so loading it never needs the tokenizer."""
    if cfg.init_token_ids:
        return dataclasses.replace(cfg, tokenizer=None)
    return dataclasses.replace(cfg, init_token_ids=token_ids(cfg, method), tokenizer=None,
                               tokenizer_name_or_path=cfg.tokenizer_name_or_path
                               or getattr(cfg.tokenizer, "name_or_path", None) or None)


def config_dict(cfg) -> dict:
    # the tokenizer object is not data: record where it came from instead
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "tokenizer"}
    if cfg.tokenizer is not None and not d["tokenizer_name_or_path"]:
        d["tokenizer_name_or_path"] = getattr(cfg.tokenizer, "name_or_path", None) or None
    return {"method": cfg.method, **d}


def repeat_to(ids: list[int], n: int) -> torch.Tensor:
    """Repeat a short id list / truncate a long one to ``n`` ids (peft's rule)."""
    return torch.tensor((list(ids) * -(-n // len(ids)))[:n])


def check_ids(model: nn.Module, ids: torch.Tensor, method: str) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise DeltaError(f"{method}: init token id out of range for a vocabulary of {vocab}; "
                         "was the tokenizer made for this model?")


# --------------------------------------------------------------------------- container + hook

def store(model: nn.Module, create: bool = False) -> Store | None:
    s = model._modules.get(STORE)
    if s is None and create:
        s = Store()
        model._modules[STORE] = s
        hooks = (model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
                 model.register_forward_hook(_post_forward, with_kwargs=True))
        model_state.put(model, model_state.VIRTUAL_HOOK, hooks)
    return s


def remove(model: nn.Module, name: str) -> None:
    """Drop adapter ``name``; the container and the hook go with the last one."""
    s = model._modules.get(STORE)
    if s is None:
        return
    if name in s.deltas:
        del s.deltas[name]
    if not len(s.deltas):
        del model._modules[STORE]
        for handle in model_state.pop(model, model_state.VIRTUAL_HOOK, ()):
            handle.remove()


def file_key(key: str) -> str:
    # peft writes prompt learning files as {"prompt_embeddings", "base_model.<module path>..."}
    return key if key == "prompt_embeddings" else "base_model." + key


def from_file_key(key: str) -> str:
    if key.startswith(PREFIX):  # written by a LoRA-style writer: tolerate it
        return key.removeprefix(PREFIX)
    return key.removeprefix("base_model.")


def _as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of ``model.forward`` turned into keywords."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(model.forward)
    bound = sig.bind_partial(*args, **kwargs)
    out = {}
    for k, v in bound.arguments.items():
        kind = sig.parameters[k].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(v)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise DeltaError(f"{type(model).__name__}.forward takes *args; call it with keyword arguments "
                             "(input_ids=..., attention_mask=...) when a prompt adapter is active")
        else:
            out[k] = v
    return out


def _cat_front(t: torch.Tensor, n: int, value) -> torch.Tensor:
    """Prepend ``n`` columns filled with ``value`` to a (B, T, ...) tensor."""
    front = torch.full((t.shape[0], n, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([front, t], dim=1)


# --------------------------------------------------------------------------- rows: who gets which tokens

Row = tuple  # the virtual-token modules (PromptEmbedding / PrefixEncoder) one batch row gets, in order


def _names(st) -> list:
    return st.row_adapters if st.row_adapters is not None else st.active


def _rows(st, s: Store, batch: int, device: torch.device) -> list[Row]:
    """Per batch row, its virtual-token modules: the active ones for every row, or in a mixed batch
    (``dt.mixed``, active setting ignored) the row's own adapter, none for None / LoRA & co. rows."""
    if st.row_adapters is None:
        return [tuple(s.deltas[n] for n in st.active if n in s.deltas)] * batch
    plan = st.row_adapters if isinstance(st.row_adapters, RowPlan) else RowPlan(st.row_adapters)
    names = plan.expand(batch, device)[0]  # beams / return sequences map to their prompt's row
    return [(s.deltas[a],) if a is not None and a in s.deltas else () for a in names]


def _count(row: Row, kind: str) -> int:
    return sum(a.num_virtual_tokens for a in row if a.kind == kind)


def _stack_rows(rows: list[Row], part, n: int, dim: int) -> torch.Tensor:
    """``part(row)`` (a tensor with at most n entries along ``dim``, or None for none) for every
    row, left-padded with zeros to n along ``dim`` and stacked on a new batch dim 0.  Computed once
    per distinct row; expanded, not copied, when all rows are alike (a single-adapter batch)."""
    made = {r: part(r) for r in dict.fromkeys(rows)}  # distinct rows, first-seen order
    like = next(t for t in made.values() if t is not None)
    full = [*like.shape[:dim], n, *like.shape[dim + 1:]]

    def pad(t):
        if t is None:
            return like.new_zeros(full)
        gap = [*full[:dim], n - t.shape[dim], *full[dim + 1:]]
        return torch.cat([t.new_zeros(gap), t], dim) if gap[dim] else t

    made = {r: pad(t) for r, t in made.items()}
    if len(made) == 1:
        return next(iter(made.values())).unsqueeze(0).expand(len(rows), *full)
    return torch.stack([made[r] for r in rows])


def _prompt_part(row: Row):
    parts = [a.embeddings() for a in row if a.kind == "prompt"]
    return torch.cat(parts, dim=0) if parts else None  # (P_i, D)


def _prefix_part(row: Row):
    parts = [a.key_values() for a in row if a.kind == "prefix"]
    return torch.cat(parts, dim=3) if parts else None  # (L, 2, H_kv, F_i, d_h)


# --------------------------------------------------------------------------- the hook

def _pre_forward(model: nn.Module, args: tuple, kwargs: dict):
    st = model_state.get(model, model_state.STATE)
    s = model._modules.get(STORE)
    if st is None or s is None or st.disabled or not any(n is not None and n in s.deltas for n in _names(st)):
        return None
    kw = _as_kwargs(model, args, kwargs)
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    if ref is None:
        raise DeltaError("prompt/prefix adapters need input_ids or inputs_embeds in the call")
    batch, length, dev = ref.shape[0], ref.shape[1], ref.device
    rows = _rows(st, s, batch, dev)
    n_p, n_f = [_count(r, "prompt") for r in rows], [_count(r, "prefix") for r in rows]
    p_max, f_max = max(n_p), max(n_f)
    # a mixed batch whose rows need different numbers of virtual slots: the short rows get masked
    # slots in front (zero embedding / zero key-value, attention mask 0) and explicit positions,
    # so each row computes what it computes alone (check_mixed admits only models where that holds)
    padded = len(set(zip(n_p, n_f))) > 1
    P = torch.tensor(n_p, device=dev)[:, None]  # (B, 1) prompt tokens of each row
    F = torch.tensor(n_f, device=dev)[:, None]  # (B, 1) prefix tokens of each row
    key = cache_kwarg(model) or next((k for k in CACHE_KWARGS if k in kw), CACHE_KWARGS[0])
    past = pop_cache(kw)
    if past is not None:
        kw[key] = past
    cached = cached_tokens(past, kw)  # F_max + P_max + real tokens once filled; None: a filled state
    prefill = cached == 0
    seen = 0 if prefill or cached is None else cached - f_max - p_max  # real tokens already in the cache

    pos = kw.get("position_ids")
    if pos is not None and pos.dim() != 2:
        raise DeltaError(f"prompt/prefix adapters support 2-D position_ids only, got shape {tuple(pos.shape)}")
    if pos is None and padded:  # the model's default would number the longest row's slots: give each row its own
        mask0 = kw.get("attention_mask")
        if mask0 is not None and mask0.dim() == 2 and positions_from_mask(model):
            # OPT-style: the model counts only unmasked tokens (pads get -1), as it does alone
            pos = ((mask0.long().cumsum(1) * mask0.long()) - 1)[:, -length:].to(dev)  # (B, T)
        else:  # Llama-style: cache length + 0..T-1
            pos = torch.arange(seen, seen + length, device=dev).expand(batch, -1)  # (B, T)
    if pos is not None:
        pos = pos + (P + F).to(pos.dtype)  # real tokens come after the row's own virtual tokens
    if prefill:
        if p_max:
            if embeds is None:
                embeds = model.get_input_embeddings()(ids)  # (B, T, D); LoRA on the embedding applies
            prompt = _stack_rows(rows, _prompt_part, p_max, 0).to(embeds.dtype)  # (B, P_max, D)
            kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, P_max+T, D)
            kw["input_ids"] = None
            labels = kw.get("labels")
            if labels is not None and labels.dim() >= 2 and labels.shape[1] == length:  # token-level labels
                labels = _cat_front(labels, p_max, -100)
                if padded and length:
                    # a causal LM predicts token t at position t-1: alone, a row without a prompt
                    # never predicts its first token; here that position is a masked slot
                    labels[P[:, 0] == 0, p_max] = -100
                kw["labels"] = labels
            if kw.get("token_type_ids") is not None:
                kw["token_type_ids"] = _cat_front(kw["token_type_ids"], p_max, 0)
            if pos is not None:
                slot = torch.arange(p_max, device=dev) - (p_max - P)  # (B, P_max): token index, < 0 if masked
                pos = torch.cat([torch.where(slot >= 0, slot + F, 0).to(pos.dtype), pos], dim=1)
        if f_max:
            kw[key] = _prefix_cache(model, past, rows, f_max)
    if pos is not None:
        kw["position_ids"] = pos
    _count_slots(kw, prefill, cached, length, f_max, p_max)
    mask = kw.get("attention_mask")
    if mask is None and padded:
        mask = torch.ones(batch, seen + length, dtype=torch.long, device=dev)
    if mask is not None:
        kw["attention_mask"] = _mask_slots(mask, F, P, f_max, p_max)
    return (), kw


def _count_slots(kw: dict, prefill: bool, cached, length: int, f_max: int, p_max: int) -> None:
    """Older transformers (<5) index a KV cache by ``cache_position``: count the virtual slots.
    Only where it numbers the input tokens: Mamba's (4.x) is a conv-window index, left alone."""
    cp = kw.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.dim() == 1:
        if prefill and cp.shape[0] == length:
            kw["cache_position"] = torch.arange(f_max, f_max + p_max + length, device=cp.device)
        elif not prefill and cached is not None:
            kw["cache_position"] = cp + f_max + p_max


def _mask_slots(mask: torch.Tensor, F: torch.Tensor, P: torch.Tensor, f_max: int, p_max: int) -> torch.Tensor:
    """(B, F_max + P_max + T) attention mask: each row's own prefix and prompt slots open, the
    padding slots of rows needing fewer closed, then the given (B, T) mask."""
    if mask.dim() != 2:
        raise DeltaError(f"prompt/prefix adapters need a 2-D attention_mask (B, T), got {tuple(mask.shape)}")
    dev = F.device
    front = torch.cat([torch.arange(f_max, device=dev) >= f_max - F,  # (B, F_max): the row's prefix slots
                       torch.arange(p_max, device=dev) >= p_max - P], dim=1)  # (B, P_max): its prompt
    return torch.cat([front.to(mask.dtype), mask.to(dev)], dim=1)


def _post_forward(model: nn.Module, args: tuple, kwargs: dict, out):
    # use_cache=False: some models (Llama) still return the cache they were given; returning the
    # prefix cache would make generate() treat the next full-sequence step as a decoding step
    if kwargs.get("use_cache") is not False or output_cache(out) is None:
        return out
    st, s = model_state.get(model, model_state.STATE), model._modules.get(STORE)
    if st is not None and s is not None and not st.disabled and \
            any(n is not None and n in s.deltas and s.deltas[n].kind == "prefix" for n in _names(st)):
        for k in CACHE_KWARGS:
            if out.get(k) is not None:
                out[k] = None
    return out


def _prefix_cache(model: nn.Module, past, rows: list[Row], f_max: int):
    """A transformers cache holding each row's key/value prefix in every layer, right-aligned in
    F_max slots (filled in place when the caller passed an empty one, as ``generate`` does)."""
    from transformers import DynamicCache

    if past is None:
        past = DynamicCache(config=model.config)
    dtype = model.get_input_embeddings().weight.dtype
    kv = _stack_rows(rows, _prefix_part, f_max, 3).to(dtype)  # (B, L, 2, H_kv, F_max, d_h)
    for layer in range(kv.shape[1]):
        past.update(kv[:, layer, 0], kv[:, layer, 1], layer)  # (B, H_kv, F_max, d_h) each
    return past


# --------------------------------------------------------------------------- mixed batches

def check_mixed(model: nn.Module, rows) -> None:
    """Refuse a mixed batch (``dt.mixed``) whose rows need different numbers of virtual tokens on a
    model where masked slots would not leave every row's result as it is alone.

    Rows needing the same (prompt, prefix) token counts, e.g. prompt adapters of equal
    num_virtual_tokens, work on any model the hook drives.  Otherwise the short rows are padded
    (see ``_pre_forward``), which is exact only for a causal LM (a [CLS]/pooler head would read a
    masked slot) that takes position_ids (else the model numbers the slots too), and, when prompt
    rows and prefix rows meet, without a sliding window (it counts the slots between a row's
    prefix and its tokens)."""
    s = store(model)
    if s is None:
        return
    need, where = {}, {}  # adapter -> (prompt tokens, prefix tokens); adapter -> its rows
    for i, a in enumerate(rows):
        d = s.deltas[a] if a is not None and a in s.deltas else None
        need[a] = (0, 0) if d is None else (d.num_virtual_tokens, 0) if d.kind == "prompt" \
            else (0, d.num_virtual_tokens)
        where.setdefault(a, []).append(i)
    if len(set(need.values())) <= 1:
        return
    import inspect

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = type(model).__name__
    why = None
    if task_type(model) != "CAUSAL_LM":
        why = f"{name} is not a causal LM (its head may read a fixed position such as [CLS])"
    elif "position_ids" not in inspect.signature(model.forward).parameters:
        why = f"{name}.forward takes no position_ids, so the rows' positions cannot be kept"
    elif any(p for p, _ in need.values()) and any(f for _, f in need.values()) and \
            getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        why = (f"{name} has a sliding window, which would count the prompt slots between a prefix row's "
               "prefix and its tokens; run prompt rows and prefix rows in separate batches")
    if why:
        what = ", ".join(f"{a!r} (rows {where[a]}): " + (f"{p} prompt tokens" if p else f"{f} prefix tokens"
                                                        if f else "none") for a, (p, f) in need.items())
        raise DeltaError(f"mixed batch: rows need different numbers of virtual tokens ({what}); {why}. "
                         "Give every row an adapter with the same virtual tokens (e.g. prompt adapters of "
                         "equal num_virtual_tokens, no None / LoRA rows), or run each group in its own batch")
