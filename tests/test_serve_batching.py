"""Continuous batching (deltatune/serve/batching.py): a request joins the running batch at the next decoding
step and leaves when done, so a short request submitted while a long one decodes finishes first;
every row (LoRA, IA3, bottleneck adapter or bare base next to each other, greedy or seeded
sampling, joining at different steps) gives exactly its lone library run; prompt/prefix adapters
keep static batches in the same server; the ragged cache and its mask, per-token routing, chunked
prefill and per-step token delivery; a row whose adapter is unloaded mid-decoding fails alone; a
model whose cache cannot be spliced falls back to static."""
from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

import deltatune as dt
from conftest import tiny_gpt2, tiny_llama
from deltatune.serve import batching as serve_batching
from deltatune.serve.ragged import RaggedCache, cache_kv, make_cache
from deltatune.serve.slots import SlotCache
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


def test_long_prompt_is_fed_in_chunks_while_the_running_row_keeps_decoding():
    """prefill_chunk=2: a 9-token prompt joins over 5 steps, and the running row takes a token at
    each of them; both equal their lone runs."""
    model = model_with_adapters()
    ids = long_prompt(model, "a", 30)
    seen: list[int] = []
    at_first: list[int] = []  # the running row's token count when the joiner got its first token
    engine = Engine(model, None, EngineConfig(window_ms=1, prefill_chunk=2))
    running = Job("generate", "a", ids, max_new_tokens=30, on_token=seen.append)
    joiner = Job("generate", "c", [3 + (5 * k) % 61 for k in range(9)], max_new_tokens=4,
                 on_token=lambda t: at_first.append(len(seen)))

    async def main():
        engine.start()
        try:
            f = engine.enqueue([running])[0]
            while len(seen) < 2:
                await asyncio.sleep(0.001)
            joined_at = len(seen)
            await engine.submit(joiner)
            await f
            return joined_at
        finally:
            await engine.stop()

    joined_at = asyncio.run(main())
    assert at_first and at_first[0] - joined_at >= 4, (joined_at, at_first)  # 5 steps of prompt, the row decoding on
    assert running.result["output_ids"] == lone(model, "a", ids, 30)
    assert joiner.result["output_ids"] == lone(model, "c", joiner.ids, 4)
    with pytest.raises(dt.DeltaError, match="prefill_chunk must be at least 1"):
        Engine(model, None, EngineConfig(prefill_chunk=0))


def test_streamed_tokens_reach_the_event_loop_once_per_step_in_order():
    """Job.on_token_loop: a step's tokens go to the event loop in ONE call_soon_threadsafe
    (stream.Outbox), in order, and a streamed job gets exactly its output tokens."""
    from deltatune.serve.stream import Outbox

    calls, got = [], []

    class Loop:
        def call_soon_threadsafe(self, fn, *args):
            calls.append((fn, args))

    box = Outbox()
    box.loop = Loop()
    box.post(got.append, 1)
    box.post(got.append, 2)
    box.flush()
    box.flush()  # nothing new: no wake-up
    assert len(calls) == 1 and got == []
    fn, args = calls[0]
    fn(*args)
    assert got == [1, 2]

    model = model_with_adapters()
    streamed: dict[str, list[int]] = {"a": [], "c": []}
    jobs = [Job("generate", n, prompt(i), max_new_tokens=6, on_token_loop=streamed[n].append)
            for i, n in enumerate(["a", "c"])]
    run(Engine(model, None, EngineConfig(window_ms=20)), [(0.0, j) for j in jobs])
    for j in jobs:
        assert streamed[j.adapter] == j.result["output_ids"] == lone(model, j.adapter, j.ids, 6)


SEEDED = [Sampling(), Sampling(temperature=1.0, seed=7), Sampling(temperature=0.8, top_k=8, seed=11),
          Sampling(temperature=1.3, top_p=0.8, seed=3)]


@pytest.mark.parametrize("layout", [SlotCache, RaggedCache], ids=["slots", "ragged"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_mixed_adapters_and_seeds_joining_at_different_steps_equal_lone_runs(make, layout, monkeypatch):
    """Both KV layouts (per-row slots, and the flattened fallback); rows of 4-13 tokens leave at
    different steps, so slots are handed on (SlotCache.keep) while others decode."""
    monkeypatch.setattr(serve_batching, "LAYOUTS", (layout,))
    model = model_with_adapters(make, prompt_adapter=make is tiny_llama)
    names = ["a", "b", None, "d", "a", "p" if make is tiny_llama else "b", "c", "d", "a", "d"]
    plan = []
    for i, name in enumerate(names):
        s = SEEDED[i % len(SEEDED)]
        plan.append((0.004 * i, Job("generate", name, prompt(i), max_new_tokens=4 + 3 * (i % 4), sampling=s)))
    engine = Engine(model, None, EngineConfig(window_ms=1, max_batch=4))
    out = run(engine, plan)
    assert type(engine.running.cache) is layout
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


def test_ragged_cache_masks_rows_apart_and_rows_leave_with_their_columns():
    """The flattened cache (ragged.py): a step's tokens see their own row's earlier columns and
    their own earlier new tokens only; a row leaving takes its columns; a failed step truncates."""
    c = RaggedCache()
    first = torch.tensor([1, 1, 1, 2, 2])  # a prompt of 3 tokens (row 1) and one of 2 (row 2)
    assert (c.mask(first, torch.float32)[0, 0] == 0).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)) for _ in range(3)]
    c.cache = make_cache(kv)
    c.appended(first)
    step = c.mask(torch.tensor([2, 1, 1]), torch.float32)[0, 0]  # row 2 decodes, row 1 feeds 2 tokens
    assert (step == 0).int().tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 1, 0],
                                          [1, 1, 1, 0, 0, 0, 1, 1]]
    assert step.min() == torch.finfo(torch.float32).min
    before = cache_kv(c.cache)[0][0]
    c.keep([2, 1])  # nobody left: nothing copied
    assert c.length == 5 and cache_kv(c.cache)[0][0] is before
    c.keep([2])
    assert c.owner.tolist() == [2, 2] and torch.equal(cache_kv(c.cache)[1][1], kv[1][1][:, :, 3:])
    c.truncate(1)
    assert c.length == 1 and torch.equal(cache_kv(c.cache)[2][0], kv[2][0][:, :, 3:4])
    c.keep([])
    assert c.length == 0


def test_per_token_plan_routes_each_token_like_its_own_row():
    """mixed with a per_token plan on a (1, N) input: each token through its own adapter, as the
    rows of an ordinary mixed batch (the continuous batch's routing).  Every token attends only to
    itself here, so the flattened forward must equal N one-token rows."""
    from deltatune.mixed import row_plan

    model = model_with_adapters()
    names = ["a", "d", "b", None, "c", "a"]
    x = torch.tensor([[3 + 5 * i] for i in range(len(names))])  # (6, 1)
    with torch.no_grad():
        with dt.mixed(model, names):
            want = model(input_ids=x).logits[:, 0]  # (6, V)
        plan = row_plan(model, names)
        plan.per_token = True
        alone = RaggedCache().mask(torch.arange(len(names)), torch.float32)  # each token sees itself
        with dt.mixed(model, plan):
            got = model(input_ids=x.T, attention_mask=alone, position_ids=torch.zeros_like(x.T)).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with dt.mixed(model, ["a"] * 6):
            assert not torch.allclose(model(input_ids=x).logits[:, 0], want, atol=1e-3)  # routing mattered
        with pytest.raises(dt.DeltaError, match="per-token plan of 6 tokens met a layer input of shape"):
            with dt.mixed(model, plan):
                model(input_ids=x.reshape(2, 3))


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
    monkeypatch.setattr(serve_batching, "LAYOUTS", (RaggedCache,))
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


@pytest.mark.parametrize("wrong", ["raises", "silent"])
def test_attention_that_never_sees_the_slot_layout_falls_back_to_the_flattened_cache(monkeypatch, wrong):
    """A model whose attention ignores the step layout fails _verify for SlotCache, whether that
    raises (plain SDPA on the slot tensors: batch sizes differ) or silently computes something else
    (zeros of the right shape); the flattened RaggedCache serves instead, rows equal lone runs."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from deltatune.serve.slots import ATTN

    def silent(module, query, *a, **k):
        return torch.zeros_like(query).transpose(1, 2), None  # (1, N, H, d)

    fake = silent if wrong == "silent" else sdpa_attention_forward
    monkeypatch.setitem(AttentionInterface._global_mapping, ATTN, fake)
    model = model_with_adapters()
    engine = Engine(model, None, EngineConfig(window_ms=1))
    jobs = [Job("generate", n, prompt(i), max_new_tokens=5) for i, n in enumerate(["a", "d", None])]
    out = run(engine, [(0.0, j) for j in jobs])
    assert type(engine.running.cache) is RaggedCache
    for job, _ in out:
        assert job.result["output_ids"] == lone(model, job.adapter, job.ids, 5)


def test_slot_cache_writes_rows_apart_and_hands_a_freed_slot_to_the_last_row():
    """SlotCache (slots.py): a step writes each token at [its row's slot, its position]; a row
    leaving gives its slot to the last row, keys/values and length included; capacity grows."""
    c = SlotCache()
    rows, pos = torch.tensor([7, 7, 7, 8, 8, 9]), torch.tensor([0, 1, 2, 0, 1, 0])
    assert c.inputs(rows, pos, torch.float32) == {"attention_mask": None}
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)  # (1, H_kv, N, d)
    keys, values = c.update(k, v, 0)
    assert keys.dt_step is c.step  # what the attention function reads
    c.appended(rows)
    assert c.lens == [3, 2, 1] and c.index == {7: 0, 8: 1, 9: 2}
    assert torch.equal(keys[1, :, :2], k[0, :, 3:5]) and torch.equal(values[2, :, 0], v[0, :, 5])
    c.keep([8, 9])  # row 7 leaves: row 9 (the last slot) moves into slot 0
    assert c.ids == [9, 8] and c.lens == [1, 2] and c.index == {9: 0, 8: 1}
    keys = c.kv[0][0]
    assert torch.equal(keys[0, :, 0], k[0, :, 5]) and torch.equal(keys[1, :, :2], k[0, :, 3:5])
    c.inputs(torch.tensor([8] * 70), torch.arange(2, 72), torch.float32)  # row 8 grows past 64 columns
    keys, _ = c.update(torch.ones(1, 2, 70, 4), torch.ones(1, 2, 70, 4), 0)
    assert keys.shape[2] >= 72 and torch.equal(keys[1, :, :2], k[0, :, 3:5]) and bool((keys[1, :, 2:72] == 1).all())
    c.keep([])
    assert c.ids == [] and c.kv == []


def test_slot_attention_is_registered_with_the_first_slot_cache_not_at_import():
    """Importing the serving engine leaves transformers' attention registry as it was; the first
    SlotCache adds the engine's entry."""
    import subprocess
    import sys

    code = ("from transformers import AttentionInterface\n"
            "import deltatune.serve.batching, deltatune.serve.slots as s\n"
            "assert s.ATTN not in AttentionInterface(), 'registered at import'\n"
            "s.SlotCache()\n"
            "assert AttentionInterface()[s.ATTN] is s.slot_attention\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-500:]
