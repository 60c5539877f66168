"""The trainer: exact resume after an interruption, hooks, schedules, early stopping, NaN stop,
and deltatune models inside transformers' own Trainer."""
import math

import pytest
import torch

import deltatune as dt
from conftest import tiny_bert_cls
from deltatune import DeltaError
from deltatune.train.trainer import SCHEDULES, TrainConfig, Trainer, plot


def features(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        y = i % 2
        ids = torch.randint(4 + 20 * y, 24 + 20 * y, (6 + i % 3,), generator=g).tolist()  # label-dependent tokens
        out.append({"input_ids": ids, "labels": y})
    return out


def model_with_lora(dropout=0.1):
    m = tiny_bert_cls()
    m.train()
    dt.attach(m, "lora", r=4, dropout=dropout)  # dropout: resume must restore the RNG too
    return m


def cfg(**kw):
    base = dict(lr=5e-3, batch_size=8, grad_accum=2, max_steps=8, save_every=2, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


class Interrupt(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(tmp_path):
    feats = features()
    ref = model_with_lora()
    t_ref = Trainer(ref, feats, cfg(), output_dir=tmp_path / "ref")
    t_ref.train()
    want = {k: v.detach().clone() for k, v in dt.adapter_tensors(ref, "default").items()}

    for kill_at in (3, 5):  # after a checkpoint (step 2/4) and before the next one
        out = tmp_path / f"run{kill_at}"

        def stop(step, total, model):
            if step == kill_at:
                raise Interrupt

        m = model_with_lora()
        with pytest.raises(Interrupt):
            Trainer(m, feats, cfg(), output_dir=out, callbacks=[stop]).train()
        m2 = model_with_lora()  # a fresh process would rebuild the model the same way
        with torch.no_grad():  # scramble: resume must overwrite every trainable tensor
            for t in dt.adapter_tensors(m2, "default").values():
                t.add_(1.0)
        tr = Trainer(m2, feats, cfg(), output_dir=out)
        res = tr.train(resume=True)
        got = dt.adapter_tensors(m2, "default")
        assert res.steps == 8 and len(res.history) == 8
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), (kill_at, k)
        assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in t_ref.history], abs=1e-6)


def test_checkpoint_files_and_pruning(tmp_path):
    m = model_with_lora()
    Trainer(m, features(), cfg(keep_checkpoints=2), output_dir=tmp_path).train()
    ck = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert ck == ["step-0000006", "step-0000008"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000008"
    assert (tmp_path / "checkpoints" / "step-0000008" / "adapter" / "adapter_model.safetensors").exists()


def test_resume_with_other_plan_is_refused(tmp_path):
    Trainer(model_with_lora(), features(), cfg(max_steps=4), output_dir=tmp_path).train()
    with pytest.raises(DeltaError, match="planned 4 steps, this run plans 6"):
        Trainer(model_with_lora(), features(), cfg(max_steps=6), output_dir=tmp_path).train(resume=True)


def test_step_hooks_and_callbacks(monkeypatch):
    seen, cb = [], []
    lora = dt.METHODS["lora"]
    monkeypatch.setattr(lora, "step_hook", lambda model, name, step, total: seen.append(
        (name, step, total, any(p.grad is not None for p in model.parameters() if p.requires_grad))), raising=False)
    m = model_with_lora()
    Trainer(m, features(16), cfg(max_steps=3, grad_accum=1, save_every=None),
            callbacks=[lambda s, t, model: cb.append((s, t))]).train()
    assert seen == [("default", 1, 3, True), ("default", 2, 3, True), ("default", 3, 3, True)]
    assert cb == [(1, 3), (2, 3), (3, 3)]


def test_schedule_warmup_and_decay():
    m = model_with_lora()
    tr = Trainer(m, features(16), cfg(max_steps=10, warmup_ratio=0.2, save_every=None, grad_accum=1))
    res = tr.train()
    lrs = [h["lr"] for h in res.history]
    assert lrs[0] > lrs[1] * 0 and lrs[1] == pytest.approx(5e-3)  # warmup reaches the peak at step 2
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert SCHEDULES["cosine"](0.5) == pytest.approx(0.5) and SCHEDULES["constant"](0.9) == 1.0


def test_learns_and_early_stopping_restores_best(tmp_path):
    from deltatune.data.examples import collate
    from deltatune.app.evaluate import classify_metrics

    feats = features(48)
    m = model_with_lora(dropout=0.0)
    before = classify_metrics(m, feats, collate)["accuracy"]
    calls = []

    def ev(model):
        r = classify_metrics(model, feats, collate)
        calls.append(r["loss"])
        return r

    res = Trainer(m, feats, cfg(lr=2e-2, max_steps=30, eval_every=3, early_stopping=2, save_every=None,
                                metric="loss"), eval_fn=ev).train()
    assert res.evals and res.best is not None
    after = classify_metrics(m, feats, collate)
    assert after["loss"] == pytest.approx(res.best["loss"], abs=1e-5)  # best weights restored
    assert after["accuracy"] > max(before, 0.6)
    plot(res, tmp_path / "p.png", "accuracy")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_nan_loss_stops_with_message():
    m = model_with_lora()

    def bad_loss(model, batch):
        return model(**batch).loss * float("nan")

    with pytest.raises(DeltaError, match=r"loss is nan at step 1.*Lower --lr"):
        Trainer(m, features(8), cfg(save_every=None), loss_fn=bad_loss).train()


def test_config_validation_and_no_trainable():
    with pytest.raises(DeltaError, match="schedule"):
        Trainer(model_with_lora(), features(4), TrainConfig(schedule="exp", progress=False))
    with pytest.raises(DeltaError, match="no trainable tensors"):
        Trainer(tiny_bert_cls().requires_grad_(False), features(4), TrainConfig(progress=False))


def test_gradient_checkpointing_same_loss():
    a, b = model_with_lora(0.0), model_with_lora(0.0)
    ra = Trainer(a, features(16), cfg(max_steps=2, save_every=None)).train()
    rb = Trainer(b, features(16), cfg(max_steps=2, save_every=None, gradient_checkpointing=True)).train()
    assert [h["loss"] for h in ra.history] == pytest.approx([h["loss"] for h in rb.history], abs=1e-5)


def test_works_inside_transformers_trainer(tmp_path):
    """A deltatune model needs no wrapper for transformers.Trainer, and only the adapter moves."""
    from transformers import Trainer as HFTrainer, TrainingArguments

    from deltatune.data.examples import collate

    m = model_with_lora(0.0)
    base_before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    ad_before = {k: v.detach().clone() for k, v in dt.adapter_tensors(m, "default").items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    HFTrainer(model=m, args=args, train_dataset=features(16), data_collator=collate).train()
    assert all(torch.equal(p, base_before[n]) for n, p in m.named_parameters() if n in base_before)
    after = dt.adapter_tensors(m, "default")
    assert any(not torch.equal(after[k], ad_before[k]) for k in after if "lora_B" in k)
    dt.save(m, tmp_path / "ad")
    fresh = tiny_bert_cls()
    dt.load(fresh, tmp_path / "ad")
    x = collate(features(4))
    x.pop("labels")
    m.eval()
    assert torch.allclose(fresh(**x).logits, m(**x).logits, atol=1e-6)


def test_compile_auto_rule(monkeypatch):
    """compile="auto": only for long single-process runs with a C++ compiler; "on"/"off" obey."""
    import deltatune.train.trainer as tr

    feats = features(8)
    short = Trainer(model_with_lora(0.0), feats, cfg(max_steps=4))
    assert not short._compile()
    long = Trainer(model_with_lora(0.0), feats, cfg(max_steps=tr.COMPILE_AUTO_STEPS))
    monkeypatch.setattr(tr.shutil, "which", lambda name: "/usr/bin/" + name)
    assert long._compile()
    monkeypatch.setattr(tr.shutil, "which", lambda name: None)  # no compiler: stay eager
    assert not long._compile()
    assert Trainer(model_with_lora(0.0), feats, cfg(max_steps=4, compile="on"))._compile()
    assert not Trainer(model_with_lora(0.0), feats, cfg(max_steps=10**4, compile="off"))._compile()
    with pytest.raises(DeltaError, match="compile"):
        Trainer(model_with_lora(0.0), feats, cfg(compile="yes")).train()


@pytest.mark.slow
@pytest.mark.parametrize("opts", [dict(r=4), dict(r=4, dora=True)])
def test_compiled_training_equals_eager(opts):
    """compile="on" (regional torch.compile) trains to the same adapter as eager mode."""
    from deltatune.train.losses import causal_lm_batch_loss
    from test_fast import llama

    g = torch.Generator().manual_seed(0)
    feats = [{"input_ids": r, "labels": r} for r in torch.randint(0, 64, (16, 9), generator=g).tolist()]
    got = {}
    for mode in ("off", "on"):
        m = llama()
        dt.attach(m, "lora", targets=["q_proj", "v_proj"], **opts)
        Trainer(m, feats, cfg(max_steps=3, save_every=None, compile=mode, lr=1e-2),
                loss_fn=causal_lm_batch_loss).train()
        got[mode] = {k: v.detach().clone() for k, v in dt.adapter_tensors(m, "default").items()}
        if mode == "on":
            assert all(getattr(b, "_compiled_call_impl", None) is not None for b in m.model.layers)
    for k in got["off"]:
        torch.testing.assert_close(got["on"][k], got["off"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("failure,why", [
    ("backend", "torch.compile stopped (BackendCompilerFailed"),
    ("recompiles", "torch.compile stopped (the input shapes kept changing (more than 8 recompilations))"),
])
def test_auto_compile_failure_falls_back_to_eager(monkeypatch, caplog, failure, why):
    """A compiler failure under compile="auto" (no C++ toolchain; padded shapes that keep changing
    past the recompile cap) costs the run nothing: same adapter as eager, and one line saying so."""
    import logging

    import deltatune.train.trainer as tr
    from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit

    feats = features(16)
    ref = model_with_lora(0.0)
    Trainer(ref, feats, cfg(max_steps=3, save_every=None, compile="off")).train()

    m = model_with_lora(0.0)
    t = Trainer(m, feats, cfg(max_steps=3, save_every=None))
    monkeypatch.setattr(Trainer, "_compile", lambda self: True)
    calls = []

    def broken(self, *a, **k):  # what the failure looks like at the first compiled call
        calls.append(1)
        if failure == "backend":
            raise BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None)
        raise FailOnRecompileLimitHit("recompile_limit reached with fail_on_recompile_limit_hit=True")
    blocks = m.bert.encoder.layer
    monkeypatch.setattr(tr, "COMPILE_AUTO_STEPS", 1)
    import deltatune.fast as fast
    monkeypatch.setattr(fast, "compile_blocks",
                        lambda model, **kw: [setattr(b, "_compiled_call_impl", broken.__get__(b)) for b in blocks])
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        t.train()
    assert why in caplog.text and "--compile off" in caplog.text
    assert calls and all(b._compiled_call_impl is None for b in blocks) and t.compiled is False
    for k, v in dt.adapter_tensors(ref, "default").items():
        torch.testing.assert_close(dt.adapter_tensors(m, "default")[k], v, msg=k)
