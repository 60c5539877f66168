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


@pytest.mark.parametrize("flag,good,bad", [("head-warmup", 0.5, 1.5), ("head-lr", 0.02, -1),
                                           ("label-smoothing", 0.2, 1.0)])
def test_cli_flag_reaches_the_trainer(tmp_path, flag, good, bad):
    """The classifier-training flags (LP-FT share, the head's own rate, label smoothing) reach
    ``TrainConfig`` and a bad value is refused naming the field."""
    field = flag.replace("-", "_")
    bert = tiny_bert_dir(tmp_path / "bert")
    data = write_csv(tmp_path / "spam.csv", spam_rows(32))
    run_cli("train", "--model", bert, "--data", data, "--output", tmp_path / "run", "--max-steps", 2,
            "--batch-size", 8, f"--{flag}", good, "--no-progress", "--json")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["train_config"][field] == good
    r = run_cli("train", "--model", bert, "--data", data, "--output", tmp_path / "bad", f"--{flag}", bad, ok=False)
    assert r.exit_code != 0 and field in r.output


# TrainConfig.label_smoothing (train/losses.default_loss): single-label classification only


def _batch(n=8):
    from deltatune.data.examples import collate

    return collate(features(n))


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    import torch.nn.functional as F

    from deltatune.train.trainer import default_loss

    model, b = tiny_bert_cls(), _batch()
    with torch.no_grad():
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits  # (8, 2)
        plain, smooth = default_loss(model, b), default_loss(model, b, label_smoothing=0.2)
    assert torch.allclose(plain, F.cross_entropy(logits, b["labels"]), atol=1e-6)  # the model's own loss
    # by hand: targets (1 - eps) on the label + eps / C everywhere
    target = torch.full_like(logits, 0.2 / 2).scatter_add_(1, b["labels"][:, None], torch.full((8, 1), 0.8))
    assert torch.allclose(smooth, -(target * logits.log_softmax(-1)).sum(-1).mean(), atol=1e-6)
    assert not torch.allclose(plain, smooth)


def test_label_smoothing_reaches_the_step_and_leaves_language_models_alone():
    from deltatune.train.trainer import default_loss

    model, b = tiny_bert_cls(), _batch()
    t = Trainer(model, features(), TrainConfig(label_smoothing=0.3, progress=False, compile="off"))
    with torch.no_grad():
        assert torch.allclose(t.loss_fn(model, b), default_loss(model, b, label_smoothing=0.3))
    lm = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    lb = {"input_ids": ids, "labels": ids}
    with torch.no_grad():  # (B, T, V) logits: the model's own (shifted) loss, not smoothed
        assert torch.equal(default_loss(lm, lb, label_smoothing=0.3), lm(**lb).loss)
