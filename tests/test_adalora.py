"""AdaLoRA: the rank budget follows the cubic schedule down to the target, the regulariser's
gradient is added automatically, the trainer drives it, and the result converts to a plain LoRA
that peft loads with the same outputs."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import ids_input, run, tiny_llama, tiny_mlp
from deltatune.methods.adalora import adalora_hook, adalora_ranks, budget_schedule, orth_penalty
from deltatune.ops.adalora_convert import adalora_to_lora

OPTS = dict(targets=["fc1", "fc2"], r=6, target_r=2, tinit=4, tfinal=6, deltaT=1)


def mlp_loss(model, batch=None):
    x = ids_input(batch=4) if batch is None else batch
    return run(model, "mlp").pow(2).mean() + model(x).sum() * 0.01


def test_budget_schedule_is_cubic():
    # b0=12, bT=4, T=20, tinit=4, tfinal=6: warm-up, cubic decay over steps 5..14, then fixed
    assert budget_schedule(4, 20, 4, 6, 1, 12, 4) == (12, False)
    assert budget_schedule(5, 20, 4, 6, 1, 12, 4) == (int(8 * 0.9 ** 3 + 4), True)
    assert budget_schedule(9, 20, 4, 6, 1, 12, 4) == (int(8 * 0.5 ** 3 + 4), True)
    assert budget_schedule(15, 20, 4, 6, 1, 12, 4) == (4, True)
    assert budget_schedule(7, 20, 4, 6, 2, 12, 4)[1] is False  # deltaT=2: prune on even steps only


def test_target_reached_even_when_deltaT_misses_the_last_budget_step():
    model = dt.attach(tiny_mlp(), "adalora", **{**OPTS, "deltaT": 4})  # budget phase ends at step 14
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adalora_hook(model, total_steps=20, optimizer=opt)
    for step in range(1, 16):
        opt.zero_grad()
        mlp_loss(model).backward()
        opt.step()
        if step == 12:
            assert sum(adalora_ranks(model).values()) == budget_schedule(12, 20, 4, 6, 4, 12, 4)[0]
    assert sum(adalora_ranks(model).values()) == 4  # first step of the final phase


def test_ranks_drop_to_target_on_schedule():
    model = dt.attach(tiny_mlp(), "adalora", **OPTS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hook = adalora_hook(model, total_steps=20, optimizer=opt)
    seen = {}
    for step in range(1, 21):
        opt.zero_grad()
        mlp_loss(model).backward()
        opt.step()  # the post-hook updates importance and prunes
        seen[step] = sum(adalora_ranks(model).values())
        assert hook.global_step == step
    assert seen[4] == 12  # warm-up: nothing pruned
    for s in range(5, 15):
        assert seen[s] == budget_schedule(s, 20, 4, 6, 1, 12, 4)[0], (s, seen)
    assert seen[8] < seen[6] < 12
    assert all(seen[s] == 4 for s in range(15, 21))
    # pruned singular values are zero, so the update has exactly the kept rank
    for path, layer in dt.core.iter_delta_layers(model):
        d = layer.deltas["default"]
        assert int((d.lora_E != 0).sum()) <= d.rank
        assert torch.linalg.matrix_rank(d.delta_weight(layer.base_layer).detach(), atol=1e-7) <= d.rank


def test_budget_goes_where_the_gradient_is():
    # only fc2 matters for this loss (fc1's output is multiplied by 0): fc2 must keep the budget.
    # (no orthogonality term: its gradient alone would give fc1's P, Q a small importance)
    model = dt.attach(tiny_mlp(), "adalora", **OPTS, orth_reg_weight=0.0)
    x = ids_input(batch=4)

    def loss_fn(m):
        h = m.fc1(m.emb(x)) * 0.0 + m.emb(x).repeat(1, 1, 2)  # (B, T, 32); fc1 gets zero gradient
        return m.fc2(h).pow(2).mean()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hook = adalora_hook(model, total_steps=20, optimizer=opt)
    for _ in range(20):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    assert hook.ranks() == {"fc1": 0, "fc2": 4}


def test_orthogonality_gradient_is_added_automatically():
    torch.manual_seed(0)
    auto = dt.attach(tiny_mlp(), "adalora", **OPTS, orth_reg_weight=0.3)
    torch.manual_seed(0)
    manual = dt.attach(tiny_mlp(), "adalora", **OPTS, orth_reg_weight=0.3, auto_orth=False)
    mlp_loss(auto).backward()
    (mlp_loss(manual) + orth_penalty(manual)).backward()
    for (k, a), (_, m) in zip(dt.adapter_tensors(auto, "default").items(),
                              dt.adapter_tensors(manual, "default").items()):
        torch.testing.assert_close(a.grad, m.grad, atol=1e-6, rtol=1e-5, msg=k)
    assert orth_penalty(auto).item() > 0


def test_unknown_total_steps_is_a_clear_error():
    model = dt.attach(tiny_mlp(), "adalora", **OPTS)
    hook = adalora_hook(model)
    mlp_loss(model).backward()
    with pytest.raises(dt.DeltaError, match="total number of training steps is unknown"):
        hook.step()
    with pytest.raises(dt.DeltaError, match="no budget phase"):
        adalora_hook(model, total_steps=10)  # tinit 4 + tfinal 6 leave nothing


def test_trainer_drives_the_schedule():
    from deltatune.train.trainer import TrainConfig, Trainer

    model = dt.attach(tiny_mlp(), "adalora", **OPTS)
    g = torch.Generator().manual_seed(0)
    feats = [{"ids": torch.randint(0, 20, (7,), generator=g)} for _ in range(40)]
    cfg = TrainConfig(lr=1e-2, batch_size=2, max_steps=20, progress=False, warmup_ratio=0.0)
    Trainer(model, feats, cfg, collate=lambda rows: {"ids": torch.stack([r["ids"] for r in rows])},
            loss_fn=lambda m, b: m(b["ids"]).pow(2).mean()).train()
    assert sum(adalora_ranks(model).values()) == 4
    assert adalora_hook(model).global_step == 20


def _trained(model_fn=tiny_mlp, opts=OPTS, steps=20):
    model = dt.attach(model_fn(), "adalora", **opts)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adalora_hook(model, total_steps=steps, optimizer=opt)
    name = "mlp" if model_fn is tiny_mlp else "llama"
    for _ in range(steps):
        opt.zero_grad()
        run(model, name).float().pow(2).mean().backward()
        opt.step()
    return model


def test_to_lora_keeps_outputs_and_peft_loads_it(tmp_path):
    peft = pytest.importorskip("peft")
    opts = dict(targets=["q_proj", "v_proj", "o_proj"], r=4, target_r=2, tinit=1, tfinal=2, deltaT=1)
    model = _trained(tiny_llama, opts, steps=8)
    ranks = adalora_ranks(model)
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # uneven allocation
    y = run(model, "llama")
    adalora_to_lora(model)
    cfg = dt.adapters(model)["default"]
    assert cfg.method == "lora"
    kept = {p: r for p, r in ranks.items() if r}
    assert {p: cfg.rank_pattern.get(p, cfg.r) for p in cfg.targets} == kept
    torch.testing.assert_close(run(model, "llama"), y, atol=1e-5, rtol=1e-5)
    dt.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(run(pm, "llama"), y, atol=1e-5, rtol=1e-5)
    for p, r in kept.items():
        assert pm.get_submodule("base_model.model." + p).lora_A["default"].weight.shape[0] == r


def test_adalora_file_round_trip_and_peft_adalora(tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained()
    y = run(model, "mlp")
    dt.save(model, tmp_path)
    fresh = dt.load(tiny_mlp(), tmp_path)
    torch.testing.assert_close(run(fresh, "mlp"), y, atol=1e-6, rtol=1e-6)
    pm = peft.PeftModel.from_pretrained(tiny_mlp(), str(tmp_path)).eval()
    torch.testing.assert_close(run(pm, "mlp"), y, atol=1e-5, rtol=1e-5)


def test_rank_report_table_and_heatmap(tmp_path):
    opts = dict(targets=["q_proj", "v_proj"], r=4, target_r=2, tinit=1, tfinal=2, deltaT=1)
    model = _trained(tiny_llama, opts, steps=8)
    rep = dt.adalora_report(model)
    text = rep.table()
    for p, r in adalora_ranks(model).items():
        assert p in text
    rows, cols, z = rep.grid()
    assert rows == ["0", "1"] and cols == ["self_attn.q_proj", "self_attn.v_proj"]
    assert sum(sum(r) for r in z) == 2 * 4
    png = rep.plot(tmp_path / "ranks.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
