"""LP-FT (train/head_warmup.py): with head_warmup, only the fresh head moves during the first share
of the steps; then the method's tensors join.  Off (0) by default."""
import json

import pytest
import torch

import deltatune as dt
from cli_fixtures import run_cli, spam_rows, tiny_bert_dir, write_csv
from conftest import tiny_bert_cls, tiny_gpt2
from deltatune.train.head_warmup import head_parameters
from deltatune.train.trainer import TrainConfig, Trainer


def features(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * 8, "labels": int(r[0] % 2)} for r in ids]


def moved_per_step(head_warmup: float, steps: int = 4):
    """[(head moved, adapter moved)] after each optimizer step."""
    model = dt.attach(tiny_bert_cls(), "lora")
    head = {id(p) for p in head_parameters(model)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    prev = {n: p.detach().clone() for n, p in named}
    seen = []

    def record(step, total, m):
        moved = {n: not torch.equal(prev[n], p.detach()) for n, p in named}
        seen.append((any(v for n, v in moved.items() if id(dict(named)[n]) in head),
                     any(v for n, v in moved.items() if id(dict(named)[n]) not in head)))
        prev.update({n: p.detach().clone() for n, p in named})

    cfg = TrainConfig(max_steps=steps, batch_size=8, head_warmup=head_warmup, progress=False, warmup_ratio=0,
                      compile="off", eval_every=100)
    Trainer(model, features(), cfg, callbacks=[record]).train()
    return seen, len(head)


def test_head_alone_then_the_adapter():
    seen, n_head = moved_per_step(0.5)
    assert n_head == 2  # classifier weight + bias (the copy that trains in full)
    assert seen == [(True, False), (True, False), (True, True), (True, True)]


def test_off_by_default_and_bounded():
    seen, _ = moved_per_step(0.0)
    assert all(adapter for _, adapter in seen)
    with pytest.raises(dt.DeltaError, match="head_warmup"):
        TrainConfig(head_warmup=1.0).validate()


def test_no_fresh_head_means_nothing_to_warm_up():
    model = dt.attach(tiny_gpt2(), "lora")
    assert head_parameters(model) == []  # a causal LM keeps its pretrained lm_head


@pytest.mark.parametrize("flag,good,bad", [("head-warmup", 0.5, 1.5), ("head-lr", 0.02, -1)])
def test_cli_flag_reaches_the_trainer(tmp_path, flag, good, bad):
    """Both fresh-head flags (LP-FT share, the head's own rate) reach ``TrainConfig`` and a bad value
    is refused naming the field."""
    field = flag.replace("-", "_")
    bert = tiny_bert_dir(tmp_path / "bert")
    data = write_csv(tmp_path / "spam.csv", spam_rows(32))
    run_cli("train", "--model", bert, "--data", data, "--output", tmp_path / "run", "--max-steps", 2,
            "--batch-size", 8, f"--{flag}", good, "--no-progress", "--json")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["train_config"][field] == good
    r = run_cli("train", "--model", bert, "--data", data, "--output", tmp_path / "bad", f"--{flag}", bad, ok=False)
    assert r.exit_code != 0 and field in r.output
