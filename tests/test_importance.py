"""Importance report: the layer that carries the task scores highest, the table and plot come out,
and the LoRA config it proposes respects the parameter budget and favours that layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import ids_input, tiny_bert_cls


class TwoPaths(nn.Module):
    """y = main(x) + 0.01 · side(relu(pre(x))): the task lives in `main`."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.side = nn.Linear(16, 4)
        self.main = nn.Linear(16, 4)

    def forward(self, x):
        return self.main(x) + 0.01 * self.side(torch.relu(self.pre(x)))


def _task():
    torch.manual_seed(0)
    model = TwoPaths()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 16, generator=g) for _ in range(3)]
    shift = torch.randn(4, 16, generator=g)
    with torch.no_grad():
        batches = [(x, model(x) + x @ shift.t()) for x in xs]
    return model, batches


def mse(model, batch):
    return (model(batch[0]) - batch[1]).pow(2).mean()


@pytest.mark.parametrize("metric", ["taylor", "fisher"])
def test_the_task_layer_ranks_first(metric):
    model, batches = _task()
    rep = dt.importance(model, batches, mse, targets=["pre", "side", "main"], metric=metric)
    assert [r["module"] for r in rep.rows][0] == "main"
    assert rep.rows[0]["share"] > 0.9
    assert all(p.grad is None for p in model.parameters())


def test_to_lora_config_respects_the_budget():
    model, batches = _task()
    rep = dt.importance(model, batches, mse, targets=["pre", "side", "main"])
    cfg = rep.to_lora_config(budget=5 * 20)  # main costs in+out = 20 per rank: 5 ranks, nothing else
    assert cfg.targets == ["main"] and cfg.r == 5
    cfg = rep.to_lora_config(budget=400, r_max=8)
    ranks = {p: cfg.rank_pattern.get(p, cfg.r) for p in cfg.targets}
    assert ranks["main"] == 8 and sum(r * {"pre": 32, "side": 20, "main": 20}[p] for p, r in ranks.items()) <= 400
    dt.attach(model, cfg)
    assert dt.trainable_parameters(model).trainable <= 400
    with pytest.raises(dt.DeltaError, match="budget"):
        rep.to_lora_config(budget=5)


def test_bert_report_table_plot_and_config(tmp_path):
    model = tiny_bert_cls()
    batches = [{"input_ids": ids_input(batch=4, vocab=64), "labels": torch.tensor([0, 1, 1, 0])} for _ in range(2)]
    rep = dt.importance(model, batches)  # transformers model with labels: loss taken from the output
    names = {r["module"] for r in rep.rows}
    assert "bert.encoder.layer.1.attention.self.query" in names and "classifier" not in names
    text = rep.table()
    assert "bert.encoder.layer.0.intermediate.dense" in text and "taylor" in text
    png = rep.plot(tmp_path / "imp.png")
    assert open(png, "rb").read(4) == b"\x89PNG"
    cfg = rep.to_lora_config(budget=0.01)
    spent = sum(cfg.rank_pattern.get(p, cfg.r) * sum(rep.shapes[p]) for p in cfg.targets)
    assert 0 < spent <= 0.01 * rep.total_params
    with pytest.raises(dt.DeltaError, match="loss_fn"):
        dt.importance(model, [ids_input(vocab=64)])
