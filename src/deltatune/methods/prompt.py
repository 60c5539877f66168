"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", arXiv:2104.08691): P trainable "soft prompt" vectors are prepended to the input
embeddings of a frozen model; nothing inside the network changes.

    input_ids (B, T) ──► E (frozen) ──► X_e (B, T, D)
    soft prompt P_e (P, D), trained ──────────────┐
                                                  ▼
                      [P_e ; X_e] (B, P+T, D) ──► frozen model ──► y (B, P+T, ·)
    loss only on the real tokens: labels = [-100 × P ; labels]

Init (paper §3.2, Fig. 3(b)): "vocab" copies the embeddings of sampled vocabulary tokens (better
than random, which lands off the embedding manifold); "text" copies the embeddings of a text you
give (the paper's class-label init generalised; repeated/truncated to P tokens, as peft does);
"random" is the paper's uniform [-0.5, 0.5].

Attaches through a forward pre-hook on the top model (see ``_virtual_tokens.py``), which also
extends attention masks, labels, token types and positions, and handles ``generate()``.  Not
mergeable: the prompt is extra *input*, there is no weight to fold it into.  Files use peft's
PROMPT_TUNING layout (``prompt_embeddings`` of shape (P, D)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.delta import DeltaConfig, DeltaError, get_state
from ..core.method import Method, register
from . import _virtual_tokens as vt


@dataclass
class PromptConfig(DeltaConfig):
    num_virtual_tokens: int = 20  # P; Lester et al. Fig. 3(a): gains flatten beyond ~20 tokens
    init: str | None = None  # "vocab" | "text" | "random"; None: "text" if a text/ids is given, else "vocab"
    init_text: str | None = None  # e.g. "Classify if the SMS is spam or ham:"; needs tokenizer
    tokenizer: Any = field(default=None, repr=False)  # a transformers tokenizer for init_text (not saved)
    tokenizer_name_or_path: str | None = None  # or a local tokenizer path; recorded for peft's config
    init_token_ids: list[int] | None = None  # token ids of the init text (filled from init_text at attach)

    method = "prompt"
    size_fields = ("num_virtual_tokens",)  # bounded by the saved tensors' shapes on load

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens < 1:
            raise DeltaError(f"prompt: num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init is None:
            self.init = "text" if (self.init_text is not None or self.init_token_ids) else "vocab"
        if self.init not in INITS:
            raise DeltaError(f"prompt: init must be one of {sorted(INITS)}, got {self.init!r}")
        if self.init == "text" and self.init_text is None and not self.init_token_ids:
            raise DeltaError("prompt: init='text' needs init_text=... (with tokenizer=...) or init_token_ids=[...]")

    def to_dict(self) -> dict[str, Any]:
        return vt.config_dict(self)


# --------------------------------------------------------------------------- init schemes

def _init_random(cfg: PromptConfig, model: nn.Module, shape: tuple[int, int]) -> torch.Tensor:
    return torch.empty(shape).uniform_(-0.5, 0.5)


def _init_vocab(cfg: PromptConfig, model: nn.Module, shape: tuple[int, int]) -> torch.Tensor:
    return _embed(model, torch.randint(0, model.get_input_embeddings().weight.shape[0], (shape[0],)))


def _init_text(cfg: PromptConfig, model: nn.Module, shape: tuple[int, int]) -> torch.Tensor:
    return _embed(model, vt.repeat_to(cfg.init_token_ids, shape[0]))


def _embed(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    vt.check_ids(model, ids, "prompt")
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return emb(ids.to(emb.weight.device)).detach().float().cpu()  # (P, D)


INITS = {"random": _init_random, "vocab": _init_vocab, "text": _init_text}


# --------------------------------------------------------------------------- the module

class PromptEmbedding(nn.Module):
    """The soft prompt of one adapter: ``weight`` (P, D)."""

    kind = "prompt"

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init)  # (P, D), float32 (cast to the model dtype when used)
        self.num_virtual_tokens = init.shape[0]

    def embeddings(self) -> torch.Tensor:
        return self.weight  # (P, D)


@register
class PromptTuning(Method):
    name = "prompt"
    default_lr = 1.5e-2  # soft prompts need large steps (Lester et al. 2021 used 0.3)
    config_cls = PromptConfig
    peft_type = "PROMPT_TUNING"
    summary = "prompt tuning: trainable virtual-token embeddings prepended to the input (Lester et al. 2021)"
    default_targets = "the input embeddings"
    layer_types = ("input embeddings (transformers models)",)
    mergeable = False
    merge_note = "a soft prompt is extra input, not a weight change: there is nothing to fold it into"
    supports_mixed = True  # the hook gives each row of dt.mixed its own tokens (_virtual_tokens.py)

    def check_mixed(self, model: nn.Module, rows) -> None:
        vt.check_mixed(model, rows)  # rows needing different token counts: exact only on some models

    def attach(self, model: nn.Module, cfg: PromptConfig, name: str, state) -> None:
        vt.check_model(model, "prompt")
        emb = model.get_input_embeddings()
        if cfg.init == "text":
            state.adapters[name].config = cfg = vt.with_token_ids(cfg, "prompt")
        init = INITS[cfg.init](cfg, model, (cfg.num_virtual_tokens, emb.weight.shape[1]))
        vt.store(model, create=True).deltas[name] = PromptEmbedding(init.to(vt.param_device(model)))

    def own_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        s = vt.store(model)
        return {"prompt_embeddings": s.deltas[name].weight} if s is not None and name in s.deltas else {}

    def delete(self, model: nn.Module, name: str) -> None:
        vt.remove(model, name)

    def unload(self, model: nn.Module, name: str) -> None:
        vt.remove(model, name)  # merge-and-unload returns the bare model: the prompt cannot come along

    file_key = staticmethod(vt.file_key)
    from_file_key = staticmethod(vt.from_file_key)

    def to_peft(self, cfg: PromptConfig, model: nn.Module, name: str) -> dict[str, Any]:
        d = vt.dims(model)
        tok_path = cfg.to_dict()["tokenizer_name_or_path"]
        text = bool(cfg.init == "text" and cfg.init_text is not None and tok_path)
        init = "TEXT" if text else {"vocab": "SAMPLE_VOCAB"}.get(cfg.init, "RANDOM")
        return {
            "peft_type": "PROMPT_TUNING", "task_type": vt.task_type(model),
            "num_virtual_tokens": cfg.num_virtual_tokens,
            "token_dim": int(self.own_tensors(model, name)["prompt_embeddings"].shape[1]),
            "num_transformer_submodules": 1, "num_attention_heads": d["heads"], "num_layers": d["layers"],
            "prompt_tuning_init": init, "prompt_tuning_init_text": cfg.init_text if text else None,
            "tokenizer_name_or_path": tok_path if text else None, "tokenizer_kwargs": None,
            "modules_to_save": vt.saved_modules(model, name), "inference_mode": True, "revision": None,
            "auto_mapping": None,
        }

    def from_peft(self, d: dict[str, Any]) -> PromptConfig:
        # the weights come from the file: no tokenizer is needed to rebuild the adapter
        return PromptConfig(num_virtual_tokens=int(d["num_virtual_tokens"]), init="random",
                            init_text=d.get("prompt_tuning_init_text"),
                            tokenizer_name_or_path=d.get("tokenizer_name_or_path"),
                            modules_to_save=vt.peft_modules_to_save(d))


def virtual_positions(model: nn.Module) -> int:
    """How many virtual positions the active prompt adapters prepend to the outputs now (strip
    them with ``logits[:, n:]`` to align outputs with the input tokens).  Inside ``dt.mixed``: the
    most any row's prompt has, which every row gets (shorter rows are padded with masked slots)."""
    st = get_state(model)
    s = vt.store(model)
    if s is None or st.disabled:
        return 0
    if st.row_adapters is not None:
        return max((s.deltas[n].num_virtual_tokens for n in st.row_adapters
                    if n is not None and n in s.deltas and s.deltas[n].kind == "prompt"), default=0)
    return sum(s.deltas[n].num_virtual_tokens for n in st.active
               if n in s.deltas and s.deltas[n].kind == "prompt")
