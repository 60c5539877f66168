"""Mixed-adapter batch throughput: 8 rows over 8 different LoRA adapters vs the same 8 rows on one.

    .venv/bin/python bench/mixed.py [--layers 30] [--reps 5] [--threads 1]

Model: a Llama shaped like SmolLM2-135M (hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152;
random weights - throughput does not depend on the values).  LoRA r=16 on every linear layer by
default (the hard case: 8 adapters' weights are 29% of the base's bytes), or ``--r 8 --targets
q_proj,v_proj`` (the library default).
Cases, interleaved A/B/C in each repetition (the machine is shared and noisy), median time:
  one      - all 8 rows on adapter a0 (the normal single-adapter path)
  mixed    - row i on adapter a_i through dt.mixed (gathered bmm for LoRA)
  grouped  - the same mixed batch with the bmm disabled (one gather/delta/scatter per adapter)
Workloads: prefill (forward of 8 x 64 tokens) and decode (generate 16 new tokens greedily from
8 x 16-token prompts, KV cache on).  Throughput is reported from the process CPU time (one torch
thread by default): on a machine shared with other jobs, wall-clock time mostly measures the
others; the wall-clock ratio is printed too.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

import deltatune as dt
mixed_mod = importlib.import_module("deltatune.mixed")  # the module, not dt.mixed (the function)


def build(layers: int, n_adapters: int, r: int, targets="all-linear"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    for i in range(n_adapters):
        dt.attach(model, "lora", name=f"a{i}", r=r, alpha=2 * r, targets=targets)
        with torch.no_grad():
            for t in dt.adapter_tensors(model, f"a{i}").values():
                t.normal_(0, 0.02)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", default="all-linear", help="'all-linear' or a comma list, e.g. q_proj,v_proj")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = 8
    model = build(a.layers, n, a.r, a.targets if a.targets == "all-linear" else a.targets.split(","))
    names = [f"a{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, 49152, (n, 64), generator=g)
    prompt_ids = torch.randint(0, 49152, (n, 16), generator=g)

    def prefill():
        model(prefill_ids)

    def decode():
        model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=16,
                       min_new_tokens=16, do_sample=False, pad_token_id=0)

    def run_one(fn):
        dt.activate(model, "a0")
        fn()

    def run_mixed(fn, bmm=True):
        mixed_mod.BMM_MIN_ADAPTERS = 2 if bmm else 10**9
        try:
            with dt.mixed(model, names):
                fn()
        finally:
            mixed_mod.BMM_MIN_ADAPTERS = 2

    cases = {"one": run_one, "mixed": run_mixed, "grouped": lambda fn: run_mixed(fn, bmm=False)}
    rows = []
    with torch.inference_mode():
        for wname, fn, tokens in (("prefill 8x64", prefill, n * 64), ("decode 8x16 new", decode, n * 16)):
            times = {c: [] for c in cases}
            walls = {c: [] for c in cases}
            for c in cases:  # warm-up
                cases[c](fn)
            for _ in range(a.reps):
                for c, run in cases.items():
                    t0, w0 = time.process_time(), time.perf_counter()
                    run(fn)
                    times[c].append(time.process_time() - t0)
                    walls[c].append(time.perf_counter() - w0)
            med = {c: statistics.median(v) for c, v in times.items()}
            wmed = {c: statistics.median(v) for c, v in walls.items()}
            rows.append((wname, tokens, med))
            print(f"{wname} (CPU time): " + ", ".join(f"{c} {tokens / med[c]:.0f} tok/s" for c in cases)
                  + f" | mixed/one {med['one'] / med['mixed']:.3f}, grouped/one {med['one'] / med['grouped']:.3f}"
                  + f" | wall-clock mixed/one {wmed['one'] / wmed['mixed']:.3f}, "
                    f"grouped/one {wmed['one'] / wmed['grouped']:.3f}", flush=True)
    table = ["| workload | one adapter (tok/s) | 8 adapters, bmm (tok/s) | 8 adapters, per-group loop (tok/s) "
             "| mixed/one | grouped/one |", "|---|---|---|---|---|---|"]
    for wname, tokens, med in rows:
        table.append(f"| {wname} | {tokens / med['one']:.0f} | {tokens / med['mixed']:.0f} | "
                     f"{tokens / med['grouped']:.0f} | {med['one'] / med['mixed']:.3f} | "
                     f"{med['one'] / med['grouped']:.3f} |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
