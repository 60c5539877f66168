"""Continuous batching (deltatune/serve/batching.py): a request joins the running batch at the next decoding
step and leaves when done, so a short request submitted while a long one decodes finishes first;
every row (LoRA, IA3, bottleneck adapter or bare base next to each other, greedy or seeded
sampling, joining at different steps) gives exactly its lone library run; prompt/prefix adapters
keep static batches in the same server; the cache splicing itself; a row whose adapter is
unloaded mid-decoding fails alone; a model whose cache cannot be spliced falls back to static."""
from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

import deltatune as dt
from conftest import tiny_gpt2, tiny_llama
from deltatune.serve import batching as serve_batching
from deltatune.serve.batching import Part, Row, cache_kv, make_cache, select, splice
from deltatune.serve.engine import Engine, EngineConfig, Job, Sampling

EOS = 2
# a and d: two LoRA adapters of one rank, so mixed batches take the gathered-bmm path
ADDITIVE = {"a": ("lora", dict(r=4)), "b": ("ia3", {}), "c": ("adapter", {}), "d": ("lora", dict(r=4))}


def model_with_adapters(make=tiny_llama, prompt_adapter: bool = False):
    m = make()
    for i, (name, (method, opts)) in enumerate(ADDITIVE.items()):
        dt.attach(m, method, name=name, **opts)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for t in dt.adapter_tensors(m, name).values():
                t.add_(torch.randn(t.shape, generator=g) * 0.3)
    if prompt_adapter:
        dt.attach(m, "prompt", name="p", num_virtual_tokens=3)
    return m


def lone(model, adapter, ids, new, sampling: Sampling = Sampling()):
    """``model.generate`` on this prompt alone (``torch.manual_seed(seed)`` for sampled rows)."""
    ctx = dt.disabled(model) if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        dt.activate(model, adapter)
    kw = dict(do_sample=False)
    if sampling.temperature > 0:
        torch.manual_seed(sampling.seed)
        kw = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    with torch.no_grad(), ctx:
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, pad_token_id=0, **kw)
    toks = out[0, len(ids):].tolist()
    return toks[:toks.index(EOS)] if EOS in toks else toks


def run(engine: Engine, plan: list[tuple[float, Job]]) -> list[tuple[Job, float]]:
    """Submit each job after its delay (seconds from the start); (job, finish time) in plan order."""
    async def main():
        engine.start()
        t0 = asyncio.get_running_loop().time()
        done: dict[int, float] = {}

        async def one(i, delay, job):
            await asyncio.sleep(delay)
            await engine.submit(job)
            done[i] = asyncio.get_running_loop().time() - t0

        try:
            await asyncio.gather(*(one(i, d, j) for i, (d, j) in enumerate(plan)))
        finally:
            await engine.stop()
        return [(j, done[i]) for i, (_, j) in enumerate(plan)]

    return asyncio.run(main())


def prompt(i):
    return [3 + (7 * i + k) % 61 for k in range(3 + i % 4)]


def long_prompt(model, adapter, new):
    """A prompt whose lone greedy run under ``adapter`` does not stop early (no EOS)."""
    for i in range(40):
        if len(lone(model, adapter, prompt(i), new)) == new:
            return prompt(i)
    raise AssertionError("no prompt decodes to its full length")


def test_short_request_joining_a_long_one_finishes_first_and_both_equal_lone_runs():
    model = model_with_adapters()
    ids = long_prompt(model, "a", 48)
    seen: list[int] = []
    engine = Engine(model, None, EngineConfig(window_ms=1))
    long_job = Job("generate", "a", ids, max_new_tokens=48, on_token=seen.append)
    short_job = Job("generate", "b", prompt(5), max_new_tokens=3)

    async def main():
        engine.start()
        try:
            f_long = engine.enqueue([long_job])[0]
            while len(seen) < 4:  # the long request is decoding
                await asyncio.sleep(0.001)
            await engine.submit(short_job)
            assert not f_long.done(), "the short request waited for the long one"
            assert 4 <= len(seen) < 48
            await f_long
        finally:
            await engine.stop()

    asyncio.run(main())
    assert short_job.result["batch_size"] == 2 and long_job.result["batch_size"] == 2
    assert long_job.result["output_ids"] == lone(model, "a", ids, 48)
    assert short_job.result["output_ids"] == lone(model, "b", prompt(5), 3)


SEEDED = [Sampling(), Sampling(temperature=1.0, seed=7), Sampling(temperature=0.8, top_k=8, seed=11),
          Sampling(temperature=1.3, top_p=0.8, seed=3)]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_mixed_adapters_and_seeds_joining_at_different_steps_equal_lone_runs(make):
    model = model_with_adapters(make, prompt_adapter=make is tiny_llama)
    names = ["a", "b", None, "d", "a", "p" if make is tiny_llama else "b", "c", "d", "a", "d"]
    plan = []
    for i, name in enumerate(names):
        s = SEEDED[i % len(SEEDED)]
        plan.append((0.004 * i, Job("generate", name, prompt(i), max_new_tokens=4 + 3 * (i % 4), sampling=s)))
    engine = Engine(model, None, EngineConfig(window_ms=1, max_batch=4))
    out = run(engine, plan)
    for job, _ in out:
        assert job.error is None, job.error
        assert job.result["output_ids"] == lone(model, job.adapter, job.ids, job.max_new_tokens, job.sampling), \
            (job.adapter, job.sampling)
    assert max(j.result["batch_size"] for j, _ in out) > 1, "no rows shared a step"
    assert all(j.result["batch_size"] <= 4 for j, _ in out), "max_batch was exceeded"


def test_static_batching_still_available_and_equal():
    model = model_with_adapters()
    jobs = [Job("generate", n, prompt(i), max_new_tokens=5) for i, n in enumerate(["a", "b", None])]
    engine = Engine(model, None, EngineConfig(window_ms=50, batching="static"))
    assert engine.running is None
    for job, _ in run(engine, [(0.0, j) for j in jobs]):
        assert job.result["output_ids"] == lone(model, job.adapter, job.ids, 5)
    with pytest.raises(dt.DeltaError, match="batching must be one of"):
        Engine(model, None, EngineConfig(batching="paged"))


def test_splice_then_select_gives_back_each_rows_cache():
    """Right-aligned splicing of two parts of different lengths, and selecting rows back out."""
    g = torch.Generator().manual_seed(0)

    def part(b, t):
        kv = [(torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g)) for _ in range(3)]
        return Part([Row(Job("generate", None, [1]), None, None, 0.0) for _ in range(b)], make_cache(kv),
                    torch.ones(b, t, dtype=torch.long)), kv

    (p1, kv1), (p2, kv2) = part(2, 5), part(1, 3)
    both = splice([p1, p2])
    assert both.mask.tolist() == [[1] * 5, [1] * 5, [0, 0, 1, 1, 1]]
    k, v = cache_kv(both.cache)[1]  # (3, 2, 5, 4)
    assert torch.equal(k[:2], kv1[1][0]) and torch.equal(v[2, :, 2:], kv2[1][1][0])
    assert torch.equal(k[2, :, :2], torch.zeros(2, 2, 4))
    back = select(both, [2])  # the short row alone: its padding columns are dropped
    assert back.mask.tolist() == [[1, 1, 1]] and torch.equal(cache_kv(back.cache)[0][0], kv2[0][0])


def test_row_whose_adapter_is_unloaded_mid_decoding_fails_alone():
    model = model_with_adapters()
    ids = long_prompt(model, "b", 40)
    seen: list[int] = []
    engine = Engine(model, None, EngineConfig(window_ms=1))
    doomed = Job("generate", "a", prompt(1), max_new_tokens=40, on_token=seen.append)
    other = Job("generate", "b", ids, max_new_tokens=40)

    async def main():
        engine.start()
        try:
            futs = engine.enqueue([doomed, other])
            while len(seen) < 2:
                await asyncio.sleep(0.001)
            await engine.admin(dt.delete, model, "a")
            return await asyncio.gather(*futs, return_exceptions=True)
        finally:
            await engine.stop()

    bad, good = asyncio.run(main())
    assert getattr(bad, "status", None) == 404 and "unloaded while this request was decoding" in bad.message
    assert good.result["output_ids"] == lone(model, "b", ids, 40)


def test_model_without_a_spliceable_cache_falls_back_to_static(monkeypatch):
    def refuse(cache):
        raise serve_batching.Unsupported("test")

    monkeypatch.setattr(serve_batching, "cache_kv", refuse)
    model = model_with_adapters()
    engine = Engine(model, None, EngineConfig(window_ms=1))
    jobs = [Job("generate", n, prompt(i), max_new_tokens=4) for i, n in enumerate(["a", None])]
    out = run(engine, [(0.0, j) for j in jobs])
    assert engine.running is None
    for job, _ in out:
        assert job.result["output_ids"] == lone(model, job.adapter, job.ids, 4)


def test_row_plan_reused_for_other_rows_of_the_same_adapters_routes_them_right():
    """mixed.row_plan / RowPlan.with_rows (what the decoding loop reuses between steps)."""
    from deltatune.mixed import row_plan

    model = model_with_adapters()
    x = torch.tensor([prompt(i)[:3] for i in range(4)])
    plan = row_plan(model, ["a", "d", "a", "c"])
    with torch.no_grad(), dt.mixed(model, plan):
        model(input_ids=x)  # fills the plan's layer plans and stacks
    other = plan.with_rows(["c", "a", "d", "d"])
    with torch.no_grad():
        with dt.mixed(model, other):
            got = model(input_ids=x).logits
        with dt.mixed(model, ["c", "a", "d", "d"]):
            want = model(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(dt.DeltaError, match="with_rows needs the same adapters"):
        plan.with_rows(["a", None])
