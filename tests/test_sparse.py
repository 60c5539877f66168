"""Gradient-selected sparse fine-tuning: the rules find the weights that matter on a task whose
answer is known, only those entries train, the file size follows the budget, merging is exact."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import ids_input, run, tiny_gpt2, tiny_llama
from deltatune.methods.sparse import select_sparse

IN, OUT = 24, 6


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.lin(x)


def known_task(seed=0):
    """Targets come from W + ΔW*, where ΔW* has 2 entries per output row: the loss gradient at W is
    -2 ΔW* E[xxᵀ]/OUT ≈ -ΔW* (x ~ N(0, I)), so those 12 entries are the right ones to train."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Regressor()
    cols = torch.stack([torch.randperm(IN, generator=g)[:2] for _ in range(OUT)])  # (OUT, 2)
    dw = torch.zeros(OUT, IN)
    dw[torch.arange(OUT)[:, None], cols] = torch.tensor([1.0, -1.5]).repeat(OUT, 1) * (1 + torch.rand(OUT, 1, generator=g))
    xs = [torch.randn(256, IN, generator=g) for _ in range(4)]
    with torch.no_grad():
        batches = [(x, model(x) + x @ dw.t()) for x in xs]
    known = set((torch.arange(OUT)[:, None] * IN + cols).view(-1).tolist())
    return model, batches, known, dw


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


@pytest.mark.parametrize("rule", ["gps", "sift", "fisher"])
def test_selection_finds_the_known_weights(rule):
    model, batches, known, _ = known_task()
    sel = select_sparse(model, batches, budget=len(known), rule=rule, loss_fn=mse, targets=["lin"])
    assert set(sel["lin"].tolist()) == known
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # left as found


def test_training_moves_only_the_selected_entries_and_learns():
    model, batches, known, dw = known_task()
    w0 = model.lin.weight.detach().clone()
    dt.attach(model, "sparse", budget=len(known), rule="gps", batches=batches, loss_fn=mse, targets=["lin"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == len(known)  # optimizer state: 2 x 12 floats, not the layer
    opt = torch.optim.AdamW(trainable, lr=0.1)
    start = sum(mse(model, b).item() for b in batches)
    for _ in range(60):
        for b in batches:
            opt.zero_grad()
            mse(model, b).backward()
            opt.step()
    assert sum(p.numel() for s in opt.state.values() for p in s.values() if p.dim()) == 2 * len(known)
    assert sum(mse(model, b).item() for b in batches) < 0.01 * start
    merged = dt.merge(model, copy=True)
    changed = set((merged.lin.weight != w0).view(-1).nonzero().view(-1).tolist())
    assert changed == known
    torch.testing.assert_close(merged.lin.weight - w0, dw, atol=0.05, rtol=0)


def test_merge_is_exact_and_unmerge_restores_bits():
    model = tiny_llama()
    batch = ids_input(vocab=64)
    dt.attach(model, "sparse", budget=500, rule="sift", batches=[(batch,)],
              loss_fn=lambda m, b: m(*b).logits.pow(2).mean())
    with torch.no_grad():
        for t in dt.adapter_tensors(model, "default").values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape) * 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    y = run(model, "llama")
    dt.merge(model, unload=False)
    for path, layer in dt.core.iter_delta_layers(model):
        d = layer.deltas["default"]
        w = layer.base_layer.weight.view(-1)
        w0 = before[f"{path}.base_layer.weight"].view(-1)
        assert torch.equal(w[d.sparse_idx], w0[d.sparse_idx] + d.sparse_values.detach())
        rest = torch.ones_like(w, dtype=torch.bool)
        rest[d.sparse_idx] = False
        assert torch.equal(w[rest], w0[rest])
    torch.testing.assert_close(run(model, "llama"), y, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    after = {k: v for k, v in model.state_dict().items() if ".deltas." not in k}
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_file_size_scales_with_budget(tmp_path):
    sizes = {}
    for k in (200, 2000):
        model = tiny_llama()
        dt.attach(model, "sparse", budget=k, rule="fisher", batches=[(ids_input(vocab=64),)],
                  loss_fn=lambda m, b: m(*b).logits.pow(2).mean())
        dt.save(model, tmp_path / str(k))
        sizes[k] = (tmp_path / str(k) / "adapter_model.safetensors").stat().st_size
        fresh = dt.load(tiny_llama(), tmp_path / str(k))
        assert sum(fresh_idx.numel() for n, fresh_idx in dt.adapter_tensors(fresh, "default").items()
                   if n.endswith("sparse_idx")) == k
    per_entry = (sizes[2000] - sizes[200]) / 1800
    assert 11.5 <= per_entry <= 12.5  # one int64 index + one fp32 value per entry
    dense = sum(p.numel() for p in tiny_llama().parameters()) * 4
    assert sizes[200] < dense / 20


def test_gps_on_gpt2_conv1d_picks_per_output_neuron():
    model = tiny_gpt2()
    sel = select_sparse(model, [(ids_input(vocab=64),)], budget=3 * 32 * 3, rule="gps", targets=["c_fc"],
                        loss_fn=lambda m, b: m(*b).logits.pow(2).mean())
    assert sum(len(i) for i in sel.values()) == 288  # exactly the budget: 256 neurons, 1 each + 32 get 2
    for path, idx in sel.items():  # Conv1D weight is (in=32, out=128): entries per output column
        counts = torch.bincount(idx % 128, minlength=128)
        assert set(counts.tolist()) <= {1, 2}, path


def test_select_then_attach_and_errors():
    model, batches, known, _ = known_task()
    sel = dt.select_sparse(model, batches, budget=0.02, loss_fn=mse, targets=["lin"], rule="sift")
    assert len(sel["lin"]) == int(0.02 * sum(p.numel() for p in model.parameters()))
    dt.attach(model, "sparse", selection=sel)
    assert dt.adapters(model)["default"].counts == {"lin": len(sel["lin"])}
    assert "batches" not in dt.adapters(model)["default"].to_dict()
    with pytest.raises(dt.DeltaError, match="pass batches"):
        dt.attach(Regressor(), "sparse")
    with pytest.raises(dt.DeltaError, match="budget"):
        dt.select_sparse(Regressor(), batches, budget=10**6, loss_fn=mse)
    with pytest.raises(dt.DeltaError, match="rule"):
        dt.attach(Regressor(), "sparse", rule="random", batches=batches)
