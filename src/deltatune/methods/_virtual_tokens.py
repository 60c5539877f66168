"""Shared machinery of the prompt-learning methods (``prompt``, ``prefix``): virtual tokens that
live at the *model* level, not in a wrapped layer.

How they attach (documented choice): one forward pre-hook with kwargs on the user's top model
(``register_forward_pre_hook(with_kwargs=True)``) rewrites the call before the model sees it:

    model(input_ids, attention_mask, labels, position_ids, past_key_values, ...)
      │  prompt  (P_p tokens): inputs_embeds = [prompt ; embed(input_ids)]        (B, P_p+T, D)
      │                        labels        = [-100 × P_p ; labels]              (causal LM)
      │                        token_type_ids = [0 × P_p ; token_type_ids]
      │  prefix  (P_f tokens): past_key_values = DynamicCache holding the prefix  (B, H_kv, P_f, d_h)
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

from ..core import PREFIX, STATE_ATTR, DeltaError

STORE = "deltatune_virtual"  # attribute of the top model holding every prompt/prefix adapter
_HOOK = "_deltatune_virtual_hook"  # model.__dict__ key of the hook handle

# peft task_type from the class name of a transformers model (peft picks its wrapper with it)
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


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


def dims(model: nn.Module) -> dict[str, int]:
    """Layer count, hidden size, attention heads and key/value heads, read as peft reads them."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    hidden = getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    if not (hidden and heads and layers):
        raise DeltaError(f"cannot read hidden_size / num_attention_heads / num_hidden_layers from "
                         f"{type(model.config).__name__}; prompt methods need a transformers config")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return {"hidden": hidden, "heads": heads, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}


def task_type(model: nn.Module) -> str:
    cls = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if cls.endswith(suffix)), "FEATURE_EXTRACTION")


def param_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def saved_modules(model: nn.Module, name: str) -> list[str] | None:
    from ..core import CopyDelta, iter_delta_layers

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
        model.__dict__[_HOOK] = (model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
                                 model.register_forward_hook(_post_forward, with_kwargs=True))
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
        for handle in model.__dict__.pop(_HOOK, ()):
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


def _pre_forward(model: nn.Module, args: tuple, kwargs: dict):
    st = model.__dict__.get(STATE_ATTR)
    s = model._modules.get(STORE)
    if st is None or s is None or st.disabled:
        return None
    active = [s.deltas[n] for n in st.active if n in s.deltas]
    if not active:
        return None
    kw = _as_kwargs(model, args, kwargs)
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    if ref is None:
        raise DeltaError("prompt/prefix adapters need input_ids or inputs_embeds in the call")
    batch, length = ref.shape[0], ref.shape[1]
    prompts = [a for a in active if a.kind == "prompt"]
    prefixes = [a for a in active if a.kind == "prefix"]
    n_prompt = sum(a.num_virtual_tokens for a in prompts)
    n_prefix = sum(a.num_virtual_tokens for a in prefixes)
    past = kw.get("past_key_values")
    prefill = past is None or past.get_seq_length() == 0

    pos = kw.get("position_ids")
    if pos is not None and pos.dim() != 2:
        raise DeltaError(f"prompt/prefix adapters support 2-D position_ids only, got shape {tuple(pos.shape)}")
    if prefill:
        if prompts:
            if embeds is None:
                embeds = model.get_input_embeddings()(ids)  # (B, T, D); LoRA on the embedding applies
            p = torch.cat([a.embeddings() for a in prompts], dim=0).to(embeds.dtype)  # (P_p, D)
            kw["inputs_embeds"] = torch.cat([p.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
            kw["input_ids"] = None
            labels = kw.get("labels")
            if labels is not None and labels.dim() >= 2 and labels.shape[1] == length:  # token-level labels
                kw["labels"] = _cat_front(labels, n_prompt, -100)
            if kw.get("token_type_ids") is not None:
                kw["token_type_ids"] = _cat_front(kw["token_type_ids"], n_prompt, 0)
            if pos is not None:
                virt = torch.arange(n_prompt, device=pos.device, dtype=pos.dtype).expand(batch, -1)
                pos = torch.cat([virt, pos + n_prompt], dim=1)
        if prefixes:
            kw["past_key_values"] = _prefix_cache(model, past, prefixes, batch)
        if pos is not None:
            kw["position_ids"] = pos + n_prefix
    elif pos is not None:  # decoding: the virtual tokens are in the cache already
        kw["position_ids"] = pos + n_prompt + n_prefix
    mask = kw.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise DeltaError(f"prompt/prefix adapters need a 2-D attention_mask (B, T), got {tuple(mask.shape)}")
        kw["attention_mask"] = _cat_front(mask, n_prompt + n_prefix, 1)
    return (), kw


def _post_forward(model: nn.Module, args: tuple, kwargs: dict, out):
    # use_cache=False: some models (Llama) still return the cache they were given; returning the
    # prefix cache would make generate() treat the next full-sequence step as a decoding step
    if kwargs.get("use_cache") is not False or not isinstance(out, dict) or out.get("past_key_values") is None:
        return out
    st, s = model.__dict__.get(STATE_ATTR), model._modules.get(STORE)
    if st is not None and s is not None and not st.disabled and \
            any(s.deltas[n].kind == "prefix" for n in st.active if n in s.deltas):
        out["past_key_values"] = None
    return out


def _prefix_cache(model: nn.Module, past, prefixes: list, batch: int):
    """A transformers cache holding the key/value prefix of every layer (filled in place when the
    caller passed an empty one, as ``generate`` does)."""
    from transformers import DynamicCache

    if past is None:
        past = DynamicCache(config=model.config)
    dtype = model.get_input_embeddings().weight.dtype
    kv = torch.cat([a.key_values() for a in prefixes], dim=3).to(dtype)  # (L, 2, H_kv, P_f, d_h)
    for layer in range(kv.shape[0]):
        k = kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H_kv, P_f, d_h)
        v = kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)
        past.update(k, v, layer)
    return past
