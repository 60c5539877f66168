"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", arXiv:2101.00190): every attention layer gets P trainable key/value vectors that all
real tokens can attend to; the model's weights stay frozen.

    layer l:  K_l = [Pk_l ; W_k h]   V_l = [Pv_l ; W_v h]          Pk_l, Pv_l: (H_kv, P, d_h)
              softmax(Q K_lᵀ / √d_h) V_l                            (real tokens see the prefix)

    training (reparameterised, §4.3, prefix_projection=True):
        [Pk ; Pv] = MLP(E),  E (P, H_kv·d_h),  MLP = Linear(H_kv·d_h → 512) ─ tanh ─ Linear(→ L·2·H_kv·d_h)
    saving / inference: the MLP is folded away, only the table MLP(E) (P, L·2·H_kv·d_h) is kept
        (peft's ``prompt_embeddings``; read as (P, L, 2, H_kv, d_h): layer l's key then value).

The prefix is handed to the model as a transformers ``DynamicCache`` (``cache``, ``past_key_values`` in older transformers) by the
forward pre-hook of ``_virtual_tokens.py``, which also extends the attention mask and shifts the
positions by P (as peft does), so decoders (Llama, GPT-2) can ``generate()`` and encoders (BERT)
attend to the prefix bidirectionally.  Not mergeable: the prefix is extra keys/values in the
softmax, not a weight change.  Not compatible with gradient checkpointing (the cache is mutated).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import model_state
from ..core.delta import DeltaConfig, DeltaError, get_state
from ..core.method import Method, register
from . import _virtual_tokens as vt
from ..core.adapters import refresh


@dataclass
class PrefixConfig(DeltaConfig):
    num_virtual_tokens: int = 10  # P; Li & Liang Fig. 4: table-to-text peaks near 10 (200 for summarisation)
    prefix_projection: bool = True  # train through the MLP (§4.3): direct optimisation is unstable
    encoder_hidden_size: int = 512  # MLP width; the paper's 512 (table-to-text), 800 for summarisation
    init: str | None = None  # "random" | "vocab" | "text"; None: "random" with the MLP, else "vocab" (§7.2)
    init_text: str | None = None  # init the table with this text's keys/values (needs tokenizer)
    tokenizer: Any = field(default=None, repr=False)  # a transformers tokenizer for init_text (not saved)
    tokenizer_name_or_path: str | None = None  # or a local tokenizer path
    init_token_ids: list[int] | None = None  # token ids of the init text (filled from init_text at attach)

    method = "prefix"
    size_fields = ("num_virtual_tokens",)  # bounded by the saved tensors' shapes on load

    def __post_init__(self):
        for k in ("num_virtual_tokens", "encoder_hidden_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DeltaError(f"prefix: {k} must be a positive integer, got {v!r}")
        if self.init is None:
            words = self.init_text is not None or self.init_token_ids
            self.init = "random" if self.prefix_projection else ("text" if words else "vocab")
        if self.init not in ("random", "vocab", "text"):
            raise DeltaError(f"prefix: init must be 'random', 'vocab' or 'text', got {self.init!r}")
        if self.init != "random" and self.prefix_projection:
            raise DeltaError(f"prefix: init={self.init!r} copies real keys/values into the prefix table, which the "
                             "MLP cannot produce; pass prefix_projection=False, or init='random'")
        if self.init == "text" and self.init_text is None and not self.init_token_ids:
            raise DeltaError("prefix: init='text' needs init_text=... (with tokenizer=...) or init_token_ids=[...]")

    def to_dict(self) -> dict[str, Any]:
        return vt.config_dict(self)


class PrefixEncoder(nn.Module):
    """The prefix of one adapter: either ``embedding`` + ``mlp`` (reparameterised, training) or
    the folded table ``weight`` (P, L·2·H_kv·d_h)."""

    kind = "prefix"

    def __init__(self, tokens: int, layers: int, kv_heads: int, head_dim: int, projection: bool, hidden: int):
        super().__init__()
        self.num_virtual_tokens, self.shape = tokens, (tokens, layers, 2, kv_heads, head_dim)
        kv_dim, width = kv_heads * head_dim, layers * 2 * kv_heads * head_dim
        self.projection = projection
        if projection:
            self.embedding = nn.Parameter(torch.randn(tokens, kv_dim))  # (P, H_kv·d_h)
            self.mlp = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.weight = nn.Parameter(torch.randn(tokens, width))  # (P, L·2·H_kv·d_h), peft's init

    def table(self) -> torch.Tensor:
        return self.mlp(self.embedding) if self.projection else self.weight  # (P, L·2·H_kv·d_h)

    def key_values(self) -> torch.Tensor:
        return self.table().view(self.shape).permute(1, 2, 3, 0, 4)  # (L, 2, H_kv, P, d_h)


def cache_layout(model: nn.Module) -> dict[str, int]:
    """Layers, key/value heads and head size of the model's KV cache, read off the cache the
    frozen model itself fills for one token (transformers' code is the oracle: a config may carry
    ``num_key_value_heads`` that the architecture ignores, GPT-2 style, or mix attention with
    state-space / convolution layers that hold no keys).  Cached on the model: it never changes."""
    known = model_state.get(model, model_state.CACHE_LAYOUT)
    if known is not None:
        return known
    from transformers import DynamicCache

    st = get_state(model)
    cache = DynamicCache(config=model.config)
    ids = torch.ones(1, 1, dtype=torch.long, device=vt.param_device(model))
    was, st.disabled = st.disabled, True  # the bare model, whatever else is attached
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{vt.cache_kwarg(model) or "cache": cache})
    except Exception as e:  # a model whose forward cannot take a cache this way
        raise DeltaError(f"prefix: {type(model).__name__} could not run with a transformers cache "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); use prompt tuning or lora") from None
    finally:
        st.disabled = was
    layers = getattr(cache, "layers", None)
    keys = [getattr(lay, "keys", None) for lay in layers or ()]
    bad = [i for i, k in enumerate(keys) if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[2] != 1]
    if not keys or bad:
        raise DeltaError(f"prefix: {type(model).__name__} has cache layers {bad or 'none'} that hold no per-token "
                         "keys/values (state-space, convolution or linear-attention layers), so a prefix "
                         "cannot reach them; use prompt tuning or lora")
    shapes = {tuple(k.shape[1:]) for k in keys}
    if len(shapes) != 1:
        raise DeltaError(f"prefix: {type(model).__name__}'s layers cache keys of different shapes {sorted(shapes)}; "
                         "a prefix table needs one (heads, head_dim) for every layer: use prompt tuning or lora")
    heads, _, head_dim = shapes.pop()
    out = {"layers": len(keys), "kv_heads": int(heads), "head_dim": int(head_dim)}
    model_state.put(model, model_state.CACHE_LAYOUT, out)
    return out




def _build(model: nn.Module, cfg: PrefixConfig, projection: bool) -> PrefixEncoder:
    d = cache_layout(model)
    return PrefixEncoder(cfg.num_virtual_tokens, d["layers"], d["kv_heads"], d["head_dim"], projection,
                         cfg.encoder_hidden_size).to(vt.param_device(model))


def real_key_values(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's keys/values for ``ids`` (P,), as a prefix table (P, L·2·H_kv·d_h): Li & Liang
    §7.2 found initialising with activations of real words much better than random.  (Measured on
    SmolLM2-135M, 8 virtual tokens: chatterbot loss 2.59 bare, 7.30 with an N(0,1) table, peft's
    default; real-word init starts near the bare loss.)"""
    from transformers import DynamicCache

    vt.check_ids(model, ids, "prefix")
    st = get_state(model)
    cache = DynamicCache(config=model.config)  # passed explicitly: encoders fill it too
    was, st.disabled = st.disabled, True  # the bare model, whatever else is attached
    try:
        with torch.no_grad():
            model(input_ids=ids[None].to(vt.param_device(model)), **{vt.cache_kwarg(model) or "cache": cache})
    finally:
        st.disabled = was
    kv = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in cache.layers])  # (L, 2, H, P, d)
    return kv.permute(3, 0, 1, 2, 4).reshape(ids.shape[0], -1).float()  # (P, L·2·H·d)


@register
class PrefixTuning(Method):
    name = "prefix"
    default_lr = 5e-3  # soft prompts need large steps
    config_cls = PrefixConfig
    peft_type = "PREFIX_TUNING"
    summary = "prefix tuning: trainable key/value prefixes at every attention layer (Li & Liang 2021)"
    default_targets = "keys/values of every attention layer"
    layer_types = ("attention layers reading a transformers Cache",)
    mergeable = False
    merge_note = "a prefix adds keys/values to every softmax, which no weight change reproduces"
    supports_mixed = True  # the hook gives each row of dt.mixed its own tokens (_virtual_tokens.py)

    def check_mixed(self, model: nn.Module, rows) -> None:
        vt.check_mixed(model, rows)  # rows needing different token counts: exact only on some models

    def attach(self, model: nn.Module, cfg: PrefixConfig, name: str, state) -> None:
        vt.check_model(model, "prefix")
        backbone = getattr(model, "base_model", model)
        if vt.cache_kwarg(backbone) is None:
            raise DeltaError(f"prefix: {type(backbone).__name__}.forward takes no KV cache (cache / past_key_values), "
                             "so a prefix cannot reach its attention layers; use prompt tuning or lora instead")
        if vt.cache_kwarg(model) is None:
            raise DeltaError(f"prefix: {type(model).__name__}.forward does not pass a KV cache on to "
                             f"{type(backbone).__name__} in this transformers release, so a prefix cannot reach its "
                             "attention layers; use prompt tuning or lora instead")
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise DeltaError("prefix: gradient checkpointing re-runs layers against a mutated cache; "
                             "call deltatune.fast.disable_checkpointing(model) first")
        if cfg.init == "text":
            state.adapters[name].config = cfg = vt.with_token_ids(cfg, "prefix")
        enc = _build(model, cfg, cfg.prefix_projection)
        if cfg.init != "random":
            n = cfg.num_virtual_tokens
            ids = vt.repeat_to(cfg.init_token_ids, n) if cfg.init == "text" else \
                torch.randint(0, model.get_input_embeddings().weight.shape[0], (n,))
            with torch.no_grad():
                enc.weight.copy_(real_key_values(model, ids))
        vt.store(model, create=True).deltas[name] = enc

    def own_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        s = vt.store(model)
        if s is None or name not in s.deltas:
            return {}
        enc = s.deltas[name]
        if not enc.projection:
            return {"prompt_embeddings": enc.weight}
        return {f"prefix_encoder.{k}": p for k, p in enc.named_parameters()}

    def export(self, model, name, tensors, cfg: PrefixConfig):
        # fold the MLP away: the file holds the prefix table only (what peft saves)
        enc = vt.store(model).deltas[name]
        if not enc.projection:
            return tensors, cfg
        out = {k: v for k, v in tensors.items() if not k.startswith("prefix_encoder.")}
        with torch.no_grad():
            out["prompt_embeddings"] = enc.table().detach()
        return out, dataclasses.replace(cfg, prefix_projection=False, init="random")

    def delete(self, model: nn.Module, name: str) -> None:
        vt.remove(model, name)

    def unload(self, model: nn.Module, name: str) -> None:
        vt.remove(model, name)

    file_key = staticmethod(vt.file_key)
    from_file_key = staticmethod(vt.from_file_key)

    def to_peft(self, cfg: PrefixConfig, model: nn.Module, name: str) -> dict[str, Any]:
        d = cache_layout(model)
        return {
            "peft_type": "PREFIX_TUNING", "task_type": vt.task_type(model),
            "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": d["kv_heads"] * d["head_dim"],
            "num_transformer_submodules": 1, "num_attention_heads": d["kv_heads"], "num_layers": d["layers"],
            "encoder_hidden_size": cfg.encoder_hidden_size, "prefix_projection": False, "init_weights": None,
            "modules_to_save": vt.saved_modules(model, name), "inference_mode": True, "revision": None,
            "auto_mapping": None,
        }

    def from_peft(self, d: dict[str, Any]) -> PrefixConfig:
        if d.get("num_transformer_submodules") not in (None, 1):
            raise DeltaError("prefix: peft file for an encoder-decoder model (num_transformer_submodules=2); "
                             "deltatune supports decoder-only and encoder-only models")
        # peft saves the folded table whatever prefix_projection says
        return PrefixConfig(num_virtual_tokens=int(d["num_virtual_tokens"]), prefix_projection=False, init="random",
                            encoder_hidden_size=int(d.get("encoder_hidden_size") or 512),
                            modules_to_save=vt.peft_modules_to_save(d))


def fold(model: nn.Module, name: str = "default") -> None:
    """Replace a trained prefix adapter's MLP by the table it computes (what is saved): the same
    outputs, no MLP per forward.  Training afterwards updates the table directly."""
    rec = get_state(model).adapters.get(name)
    if rec is None or rec.method != "prefix":
        raise DeltaError(f"no prefix adapter named {name!r} to fold")
    s = vt.store(model)
    enc = s.deltas[name]
    if not enc.projection:
        return
    new = _build(model, rec.config, projection=False)
    with torch.no_grad():
        new.weight.copy_(enc.table())
    s.deltas[name] = new.train(enc.training)
    rec.config = dataclasses.replace(rec.config, prefix_projection=False, init="random")
    refresh(model)
