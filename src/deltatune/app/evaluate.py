"""Evaluation: task metrics, and *forgetting*, the change of the model's behaviour on general text
it was not trained on.

Task metrics
  * classify / image-classify: accuracy, macro-F1, mean cross-entropy loss;
  * causal-lm: token-weighted loss and perplexity = exp(loss) over the response tokens.

Forgetting (measured on :mod:`deltatune.reference_text` or a user file)
  * encoders / classifiers - representation drift: 1 − mean cosine(h_base(x), h_tuned(x)) of the
    mask-averaged last hidden states, 0 = unchanged, 1 = orthogonal;
  * causal LMs - perplexity change: 100 · (ppl_tuned / ppl_base − 1) %, on the reference text.

The base side is a *snapshot* taken before training (``Forgetting.snapshot``), or for a model
with adapters, the same model inside ``dt.disabled``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..core.delta import DeltaError, has_adapters
from ..api import disabled
from ..data.reference_text import TEXTS


def _batches(features: Sequence[dict], batch_size: int, collate: Callable, device):
    for i in range(0, len(features), batch_size):
        b = collate(list(features[i:i + batch_size]))
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def _device(model: nn.Module):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def classify_metrics(model: nn.Module, features: Sequence[dict], collate: Callable, batch_size: int = 64) -> dict:
    """accuracy, f1 (macro over classes present in labels or predictions), loss."""
    was = model.training
    model.eval()
    preds, gold, loss_sum = [], [], 0.0
    for b in _batches(features, batch_size, collate, _device(model)):
        labels = b.pop("labels")
        logits = model(**b).logits.float()  # (B, n_labels)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        preds += logits.argmax(-1).tolist()
        gold += labels.tolist()
    model.train(was)
    n = max(len(gold), 1)
    acc = sum(p == g for p, g in zip(preds, gold)) / n
    return {"accuracy": acc, "f1": macro_f1(gold, preds), "loss": loss_sum / n}


def macro_f1(gold: list[int], pred: list[int]) -> float:
    """Mean per-class F1 over the classes seen in ``gold`` or ``pred`` (sklearn's macro F1 with
    zero_division=0; computed here because importing sklearn costs seconds per CLI call)."""
    scores = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


def lm_token_loss(model: nn.Module, batch: dict) -> tuple[float, int]:
    """(sum of next-token cross-entropy over labelled tokens, number of such tokens)."""
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    # prompt tuning prepends P virtual positions (logits (B, P+T, V)): score the same T-1 real
    # next-token predictions as for the base model, so before/after compare like with like
    logits = out.logits[:, -labels.shape[1]:-1].float()  # (B, T-1, V)
    tgt = labels[:, 1:]  # (B, T-1)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                       ignore_index=-100, reduction="sum")
    return loss.item(), int((tgt != -100).sum())


@torch.no_grad()
def lm_metrics(model: nn.Module, features: Sequence[dict], collate: Callable, batch_size: int = 16) -> dict:
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for b in _batches(features, batch_size, collate, _device(model)):
        s, k = lm_token_loss(model, b)
        tot, n = tot + s, n + k
    model.train(was)
    if n == 0:
        raise DeltaError("no labelled tokens to evaluate (are all responses truncated away? raise --max-length)")
    loss = tot / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


TASK_METRICS = {"classify": classify_metrics, "image-classify": classify_metrics, "causal-lm": lm_metrics}
MAIN_METRIC = {"classify": ("accuracy", True), "image-classify": ("accuracy", True), "causal-lm": ("loss", False)}


def task_metrics(task: str, model, features, collate, batch_size: int = 32) -> dict:
    return TASK_METRICS[task](model, features, collate, batch_size)


# --------------------------------------------------------------------------- forgetting

class Forgetting:
    """``fg = Forgetting(tokenizer, task); fg.snapshot(base); ...train...; fg.measure(model)``."""

    def __init__(self, tokenizer, task: str, texts: Sequence[str] | None = None, max_length: int = 64,
                 batch_size: int = 16):
        self.kind = {"classify": "representation_drift", "causal-lm": "perplexity_change",
                     "image-classify": "representation_drift"}.get(task)
        self.images = task == "image-classify"  # reference = general photos, not text
        self.tok, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.texts = list(texts) if texts is not None else list(TEXTS)
        if not self.texts:
            raise DeltaError("the reference text set for forgetting is empty")
        self.base = None

    @property
    def available(self) -> bool:
        return self.kind is not None and (self.tok is not None or self.images)

    def _encoded(self):
        if self.images:
            yield from self._image_batches()
            return
        for i in range(0, len(self.texts), self.batch_size):
            enc = self.tok(self.texts[i:i + self.batch_size], padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt")
            yield {k: enc[k] for k in ("input_ids", "attention_mask")}

    def _image_batches(self):
        """Crops of scikit-learn's two packaged photographs (a temple, a flower): general images the
        user did not train on, resized to the model's input size and scaled to [-1, 1]."""
        if not hasattr(self, "_pixels"):
            from sklearn.datasets import load_sample_images

            cfg_size = getattr(self, "_size", (3, 224))
            c, size = cfg_size
            crops = []
            for img in load_sample_images().images:  # (427, 640, 3) uint8 each
                t = torch.tensor(img).permute(2, 0, 1).float() / 255.0  # (3, H, W)
                for y in range(0, t.shape[1] - 200, 100):
                    for x in range(0, t.shape[2] - 200, 110):
                        crops.append(t[:, y:y + 200, x:x + 200])
            px = nn.functional.interpolate(torch.stack(crops), size=(size, size), mode="bilinear",
                                           align_corners=False)  # (N, 3, S, S)
            px = px.mean(1, keepdim=True).expand(-1, c, -1, -1) if c != 3 else px
            mean, std = getattr(self, "_norm", (None, None))
            if mean is not None and std is not None and len(mean) == c == len(std):  # the model's own (timm, torchvision)
                self._pixels = (px - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)
            else:  # transformers' ViT processors: [-1, 1]
                self._pixels = (px - 0.5) / 0.5
            self.texts = [f"photo crop {i}" for i in range(len(px))]
        for i in range(0, len(self._pixels), self.batch_size):
            yield {"pixel_values": self._pixels[i:i + self.batch_size]}

    @torch.no_grad()
    def _features(self, model) -> torch.Tensor:
        was = model.training
        model.eval()
        dev, outs = _device(model), []
        if self.images:
            cfg = getattr(model, "config", None)
            self._size = (getattr(cfg, "num_channels", 3), int(getattr(cfg, "image_size", 224) or 224))
            self._norm = (getattr(cfg, "image_mean", None), getattr(cfg, "image_std", None))
        for b in self._encoded():
            b = {k: v.to(dev) for k, v in b.items()}
            h = model(**b, output_hidden_states=True).hidden_states[-1].float()  # (B, T, H) or (B, C, h, w)
            if "attention_mask" in b:
                m = b["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
                # prompt tuning prepends V virtual tokens: (B, V+T, H); drift is measured on the
                # user's T tokens, the ones the base model also saw
                h = h[:, h.shape[1] - m.shape[1]:]
                outs.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).cpu())  # (B, H)
            elif h.dim() == 2:  # images: pooled features (B, F) of deltatune.vision.classifier
                outs.append(h.cpu())
            else:  # images: mean over tokens (ViT) or over the spatial grid (CNNs)
                outs.append((h.mean(1) if h.dim() == 3 else h.flatten(2).mean(-1)).cpu())
        model.train(was)
        return torch.cat(outs)  # (N, H)

    @torch.no_grad()
    def _perplexity(self, model) -> float:
        was = model.training
        model.eval()
        dev, tot, n = _device(model), 0.0, 0
        for b in self._encoded():
            b = {k: v.to(dev) for k, v in b.items()}
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            s, k = lm_token_loss(model, b)
            tot, n = tot + s, n + k
        model.train(was)
        return math.exp(min(tot / max(n, 1), 50.0))

    def _value(self, model):
        return self._features(model) if self.kind == "representation_drift" else self._perplexity(model)

    def snapshot(self, model) -> "Forgetting":
        """Record the base behaviour (call before training, or on a model with adapters at any time)."""
        if not self.available:
            return self
        if has_adapters(model):
            with disabled(model):
                self.base = self._value(model)
        else:
            self.base = self._value(model)
        return self

    def measure(self, model) -> dict | None:
        if not self.available:
            return None
        if self.base is None:
            raise DeltaError("Forgetting.measure called before snapshot()")
        now = self._value(model)
        if self.kind == "representation_drift":
            cos = nn.functional.cosine_similarity(self.base, now, dim=-1)  # (N,)
            return {"kind": self.kind, "value": float(1 - cos.mean()), "texts": len(self.texts),
                    "description": "1 - mean cosine of base vs tuned mean-pooled hidden states on reference "
                                   + ("photos (scikit-learn sample images)" if self.images else "text")}
        return {"kind": self.kind, "value": 100.0 * (now / self.base - 1.0), "ppl_base": self.base,
                "ppl_tuned": now, "texts": len(self.texts),
                "description": "% change of perplexity on general reference text"}


def read_reference(path) -> list[str]:
    """One text per non-empty line of a UTF-8 file."""
    from pathlib import Path

    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DeltaError(f"reference text file {p} does not exist") from None
    except UnicodeDecodeError as e:
        raise DeltaError(f"{p}: not valid UTF-8 at byte {e.start}; re-save it as UTF-8") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DeltaError(f"{p}: the reference text file is empty")
    return lines
