"""Sentence-embedding checkpoints as classifiers, pooled the way they were trained.

A sentence-transformers directory (``modules.json`` naming a ``Pooling`` module, e.g.
all-MiniLM-L6-v2, the mpnet / bge / e5 / gte families) was trained so that a pooling of its token
states -- usually their *mean* -- is the sentence vector.  Its ``[CLS]`` state and BERT pooler were
never trained for that objective, yet transformers' ``AutoModelForSequenceClassification`` always
classifies from ``pooler([CLS])``.  So the body must first learn to route the sentence into
``[CLS]``: a linear probe cannot learn SMS spam from it in 20 steps (0.861, the majority class),
LoRA on query/value cannot in 40, and LoRA on every linear has to rewrite the top layers to get
there, which is what the forgetting measure then sees (docs/cli.md "sentence-embedding checkpoints").

Here such a checkpoint is classified as it is used:

    input_ids (B, T) ─► body (AutoModel, frozen or tuned) ─► states (B, T, H)
        ─► the declared pooling over the attended tokens ─► (B, H) [─► L2 norm, if declared]
        ─► dropout ─► classifier Linear(H, L), fresh ─► logits (B, L)

The body keeps its transformers name (``bert``, ``roberta`` ...: ``base_model_prefix``), so module
paths -- and adapter files -- read as those of ``BertForSequenceClassification``; the head is
``classifier``, which makes the library train it in full (``targets.auto_modules_to_save``).
Its unused BERT pooler is dropped.  A full fine-tuning run saves ``model.safetensors`` (every
key, checked on load) with the body's ``config.json`` and ``text_classifier.json``.  Checkpoints
without a ``modules.json`` Pooling entry keep transformers' own classification class.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..core.delta import DeltaError
from ..safety import load_exact

# LP-FT's share (``--head-warmup``) the CLI gives these models: the declared embedding is what the
# checkpoint was trained to make, so a linear probe on it is already strong and the body then moves
# less (Kumar et al. 2022); on transformers' pooler([CLS]) the probe is weak and LP-FT cost accuracy
SENTENCE_HEAD_WARMUP = 0.25
SPEC_FILE = "text_classifier.json"  # written by save_pretrained: the pooling of a saved full run
WEIGHTS_FILE = "model.safetensors"
MAX_JSON = 1 << 20  # sentence-transformers' modules.json / pooling config are < 1 KB; bound the read
# sentence-transformers' Pooling config flag -> our pooling name, in its own order of precedence
POOLINGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "lasttoken"}


def _json(p: Path):
    if p.stat().st_size > MAX_JSON:
        raise DeltaError(f"{p}: {p.stat().st_size} bytes, too large for a sentence-transformers config (max 1 MB)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeltaError(f"{p}: not valid JSON ({e}); repair or delete the file") from None


def sentence_pooling(path: str | Path) -> dict | None:
    """``{"pooling": "mean", "normalize": True}`` when ``path`` is a sentence-transformers
    directory whose ``modules.json`` declares a Pooling module deltatune implements, else None
    (an unknown pooling such as weighted-mean keeps transformers' own class)."""
    d = Path(path)
    if not (d / "modules.json").is_file():
        return None
    modules = _json(d / "modules.json")
    if not isinstance(modules, list):
        return None
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    pool = kinds.get("Pooling")
    if pool is None:
        return None
    cfg_file = d / str(pool.get("path", "")) / "config.json"
    if not cfg_file.resolve().is_relative_to(d.resolve()) or not cfg_file.is_file():
        return None
    cfg = _json(cfg_file)
    mode = next((name for key, name in POOLINGS.items() if isinstance(cfg, dict) and cfg.get(key)), None)
    return None if mode is None else {"pooling": mode, "normalize": "Normalize" in kinds}


def pool(states: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, H) token states, (B, T) attention mask -> (B, H) sentence vectors."""
    if mask is None:
        mask = states.new_ones(states.shape[:2])
    extra = states.shape[1] - mask.shape[1]
    if extra > 0:  # prompt tuning: its virtual tokens lead the states (B, V+T, H) and are attended
        mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
    elif extra < 0:  # prefix tuning: the mask (B, P+T) also covers the cached prefix, which has no states
        mask = mask[:, -states.shape[1]:]
    m = mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
    if how == "cls":
        return states[:, 0]
    if how == "max":
        return states.masked_fill(m == 0, torch.finfo(states.dtype).min).amax(1)
    if how == "lasttoken":  # the last attended position, left or right padding: where the count first peaks
        last = mask.long().cumsum(1).argmax(1)  # (B,)
        return states[torch.arange(states.shape[0], device=states.device), last]
    total = (states * m).sum(1)  # (B, H)
    n = m.sum(1).clamp(min=1)  # (B, 1)
    return total / (n if how == "mean" else n.sqrt())


class _NoPooler(nn.Module):
    """Stands in for the body's BERT-style pooler, which this head never reads (``pooler_output``
    becomes None): no dead parameters for a method to target or a file to carry."""

    def forward(self, *_, **__):
        return None


class PooledModelForSequenceClassification(nn.Module):
    """``body`` (a transformers AutoModel) + declared pooling + fresh ``classifier``."""

    def __init__(self, body: nn.Module, pooling: dict):
        super().__init__()
        self.prefix = getattr(body, "base_model_prefix", "") or "body"
        setattr(self, self.prefix, body)
        if isinstance(getattr(body, "pooler", None), nn.Module):
            body.pooler = _NoPooler()
        self.config = body.config
        self.config.sentence_pooling = dict(pooling)
        self._no_split_modules = getattr(body, "_no_split_modules", None)  # FSDP's blocks (train/distributed.py)
        cfg = self.config
        p = getattr(cfg, "classifier_dropout", None)
        self.dropout = nn.Dropout(p if p is not None else getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)
        hidden = getattr(cfg, "hidden_size", None) or cfg.d_model  # (d_model: T5-style encoders)
        self.classifier = nn.Linear(hidden, cfg.num_labels)  # (H) -> (L), fresh

    @property
    def head_lr_scale(self) -> float:
        """The trainer's multiplier on the head's rate floor (train/head_warmup.py): sqrt(H) when the
        head reads the unit-norm embedding (per-coordinate RMS 1/sqrt(H)), else 1."""
        return math.sqrt(self.classifier.in_features) if self.config.sentence_pooling.get("normalize") else 1.0

    @property
    def body(self) -> nn.Module:
        return getattr(self, self.prefix)

    @property
    def base_model(self) -> nn.Module:  # transformers' name for the body (prefix tuning finds its cache there)
        return self.body

    def get_input_embeddings(self) -> nn.Module:
        return self.body.get_input_embeddings()

    def gradient_checkpointing_enable(self, **kw) -> None:
        self.body.gradient_checkpointing_enable(**kw)

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_hidden_states=None, **kw):
        from transformers.modeling_outputs import SequenceClassifierOutput

        kw.pop("return_dict", None)
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states,
                        return_dict=True, **kw)
        how = self.config.sentence_pooling
        v = pool(out.last_hidden_state, attention_mask, how["pooling"])  # (B, H)
        if how.get("normalize"):
            v = nn.functional.normalize(v, dim=-1)
        logits = self.classifier(self.dropout(v))  # (B, L)
        return SequenceClassifierOutput(loss=self._loss(logits, labels), logits=logits,
                                        hidden_states=out.hidden_states, attentions=out.attentions)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor | None):
        """transformers' rule for ``*ForSequenceClassification``: regression for one output,
        cross-entropy for integer labels, else multi-label BCE."""
        if labels is None:
            return None
        cfg, n = self.config, self.config.num_labels
        if cfg.problem_type is None:
            cfg.problem_type = ("regression" if n == 1 else "single_label_classification"
                                if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
        if cfg.problem_type == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
        if cfg.problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, n).float(), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def save_pretrained(self, out: str | Path, **_) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS_FILE))
        how = self.config.sentence_pooling
        (out / SPEC_FILE).write_text(json.dumps(how, indent=2), encoding="utf-8")
        write_sentence_modules(out, how, self.classifier.in_features)


def write_sentence_modules(out: Path, how: dict, hidden: int) -> None:
    """sentence-transformers' module files, so ``SentenceTransformer(out)`` loads the tuned body
    with the same pooling (transformers drops the ``bert.`` prefix and ignores ``classifier.*``)."""
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if how.get("normalize"):
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "1_Pooling").mkdir(exist_ok=True)
    flags = {key: name == how["pooling"] for key, name in POOLINGS.items()}
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, **flags}, indent=2),
                                                   encoding="utf-8")
    (out / "modules.json").write_text(json.dumps(mods, indent=2), encoding="utf-8")


def load_pooled(path: str, pooling: dict, kw: dict) -> PooledModelForSequenceClassification:
    """A sentence-transformers checkpoint with a fresh head (``kw``: from_pretrained's keyword
    arguments, label names included)."""
    import transformers

    body = transformers.AutoModel.from_pretrained(path, **{k: v for k, v in kw.items() if k != "ignore_mismatched_sizes"})
    # in eval mode, as from_pretrained leaves a model: a server that never calls .train() must not
    # run the head's dropout (the trainer switches modes itself)
    return PooledModelForSequenceClassification(body, pooling).eval()


def load_saved(d: Path, kw: dict) -> PooledModelForSequenceClassification:
    """A full fine-tuning run's model directory: rebuild from config.json + text_classifier.json,
    then load every key of model.safetensors exactly."""
    import transformers

    pooling = _json(d / SPEC_FILE)
    if not isinstance(pooling, dict) or pooling.get("pooling") not in POOLINGS.values():
        raise DeltaError(f"{d / SPEC_FILE}: no known pooling in it; the saved model directory is damaged")
    cfg = transformers.AutoConfig.from_pretrained(str(d), trust_remote_code=kw.get("trust_remote_code", False))
    if "num_labels" in kw and kw["num_labels"] != cfg.num_labels:
        raise DeltaError(f"{d}: the model was trained on {cfg.num_labels} labels, not {kw['num_labels']}")
    body = transformers.AutoModel.from_config(cfg, trust_remote_code=kw.get("trust_remote_code", False))
    model = PooledModelForSequenceClassification(body, pooling)
    load_exact(model, d / WEIGHTS_FILE, f"a {type(body).__name__} classifier")
    return model.eval()  # as from_pretrained: see load_pooled


def is_saved(path: str | Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()
