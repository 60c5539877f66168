"""One decoding step of continuous batching vs static batching on the same rows (issue 17).

    PYTHONPATH=src .venv/bin/python bench/serve_step.py [--rows 16] [--past 16,40] [--steps 30]
                                                        [--profile SlotCache|RaggedCache]

The bench/serve.py model (Llama, hidden 256, 4 layers, vocab 4096) with 8 LoRA r=8 adapters, one
torch thread.  ``--rows`` rows, adapter a{i mod 8}, 16-token prompts; row i has already decoded
``past`` tokens spread over the given range (so rows have different lengths, as in a running
batch).  Timed, ms per step (median over ``--steps`` steps, each starting from the same cache):

  continuous   ``RunningBatch.step([])`` on an in-process engine, once per KV layout (per-row slots,
               slots.py; one flattened cache under a 4-D mask, ragged.py): the decode-only step
               as served (forward, sampling, token delivery, no HTTP)
  static       the padded (B, 1) mixed forward that ``generate`` runs per step for a static batch
               over a left-padded (B, H, T_max, d) cache (model call only: generate's own per-step
               overhead is not counted, so this is static's floor)

``--profile LAYOUT``: cProfile of that layout's continuous steps (top functions by total time).
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import pstats
import statistics
import time

import torch

import serve as base  # bench/serve.py: the model


def model_with_adapters():
    import deltatune as dt

    m = base.build_model()
    for i in range(base.N_ADAPTERS):
        dt.attach(m, "lora", name=f"a{i}", r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for t in dt.adapter_tensors(m, f"a{i}").values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return m


def running_batch(model, rows: int, past: tuple[int, int]):
    """An engine whose running batch holds ``rows`` rows, each ``past`` tokens into decoding."""
    from deltatune.serve.engine import Engine, EngineConfig, Job

    eng = Engine(model, None, EngineConfig(max_batch=rows, max_new_tokens=4096))
    eng.eos = None  # random weights: no row may stop early
    jobs = [Job("generate", f"a{i % base.N_ADAPTERS}", [(17 * i + k) % 4000 + 3 for k in range(16)],
                max_new_tokens=4096) for i in range(rows)]
    rb = eng.running
    lo, hi = past
    want = [lo + (hi - lo) * i // max(rows - 1, 1) for i in range(rows)]  # tokens decoded per row
    # row i joins (max(want) - want[i]) steps after the first, so the rows' lengths differ
    for s in range(max(want) + 1):
        rb.step([j for j, w in zip(jobs, want) if max(want) - w == s])
    return eng, rb


def static_step(model, rows: int, lens: list[int]):
    """A callable running static's decode step: (B, 1) ids over a left-padded cache of T_max."""
    from transformers import DynamicCache

    import deltatune as dt
    from deltatune.mixed import row_plan

    cfg = model.config
    t = max(lens)
    hkv, dh = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(rows, hkv, t, dh, generator=g), torch.randn(rows, hkv, t, dh, generator=g))
          for _ in range(cfg.num_hidden_layers)]
    mask = torch.zeros(rows, t + 1, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, t - n:] = 1  # left padding
    pos = torch.tensor([[n] for n in lens])
    ids = torch.tensor([[5 + i] for i in range(rows)])
    plan = row_plan(model, [f"a{i % base.N_ADAPTERS}" for i in range(rows)])

    def run():
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        with torch.inference_mode(), dt.mixed(model, plan):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().argmax(-1).tolist()

    return run


def timed(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


class Continuous:
    """A running batch on one KV layout, restorable to the same state before each timed step."""

    def __init__(self, model, rows: int, past: tuple[int, int], layout):
        from deltatune.serve import batching

        keep, batching.LAYOUTS = batching.LAYOUTS, (layout,)
        try:
            self.eng, self.rb = running_batch(model, rows, past)
        finally:
            batching.LAYOUTS = keep
        self.name = layout.__name__
        self.saved = (copy.deepcopy(self.rb.cache), [(r.pos, list(r.toks)) for r in self.rb.rows])

    def restore(self) -> None:
        self.rb.cache = copy.deepcopy(self.saved[0])
        for r, (p, t) in zip(self.rb.rows, self.saved[1]):
            r.pos, r.toks = p, list(t)

    def __call__(self) -> None:
        self.rb.step([])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--past", default="16,40", help="tokens already decoded: lo,hi over the rows")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", choices=["SlotCache", "RaggedCache"], default=None,
                    help="cProfile the continuous steps of this KV layout")
    a = ap.parse_args()
    from deltatune.serve.ragged import RaggedCache
    from deltatune.serve.slots import SlotCache

    torch.set_num_threads(1)
    lo, hi = (int(x) for x in a.past.split(","))
    model = model_with_adapters()
    arms = [Continuous(model, a.rows, (lo, hi), layout) for layout in (SlotCache, RaggedCache)]
    lens = [r.pos for r in arms[0].rb.rows]
    st = static_step(model, a.rows, lens)
    times: dict[str, list[float]] = {arm.name: [] for arm in arms}
    times["static"] = []
    for _ in range(a.steps):  # interleaved, one step each, each continuous arm from the same state
        for arm in arms:
            arm.restore()
            times[arm.name] += timed(arm, 1)
        times["static"] += timed(st, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"rows {a.rows}, row lengths {min(lens)}-{max(lens)} (sum {sum(lens)}), 1 thread, "
          f"median of {a.steps} interleaved steps")
    print(f"continuous, per-row slots (SlotCache):      {med['SlotCache']:.2f} ms/step")
    print(f"continuous, flattened 4-D mask (RaggedCache): {med['RaggedCache']:.2f} ms/step")
    print(f"static (B,1) mixed forward:                  {med['static']:.2f} ms/step")
    print(f"slots / ragged {med['SlotCache'] / med['RaggedCache']:.2f}, slots / static "
          f"{med['SlotCache'] / med['static']:.2f}, ragged / static {med['RaggedCache'] / med['static']:.2f}")
    if a.profile:
        arm = next(x for x in arms if x.name == a.profile)
        prof = cProfile.Profile()
        for _ in range(a.steps):
            arm.restore()
            prof.enable()
            arm()
            prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
