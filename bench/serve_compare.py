"""Continuous vs static batching in ``deltatune serve`` (issue 17), one run, interleaved rounds.

    .venv/bin/python bench/serve.py --compare [--reps 3] [--requests 48] [--clients 16] [--threads 1]
                                              [--request-rate 4]

Two server processes on 127.0.0.1 hold the same small random Llama (bench/serve.py: hidden 256,
4 layers, vocab 4096) and the same 8 LoRA adapters (r=8 on q,k,v,o), one with
``batching="continuous"``, one with ``batching="static"`` (a batch decodes to its longest
request).  A word-level tokenizer over the 4096 ids ("t0" ... "t4095") lets the OpenAI endpoint
stream one text chunk per token.  Each round sends ``--requests`` streaming ``/v1/completions``
requests (16-token prompts, ``max_tokens`` drawn from 8-64 with the round's seed, the same draws
for every case), adapter ``a{i mod 8}`` (mixed) or ``a0`` (one), under one of two load models:

  closed   ``--clients`` threads, each sending its next request when its previous one finished
           (every client starts at once, so both schedulers start with a full batch)
  open     Poisson arrivals at ``--request-rate`` requests/s (exponential gaps drawn with the
           round's seed, the same arrival times for every case), as vLLM's
           ``benchmark_serving.py`` drives a server: a request arriving while a static batch runs
           waits for that whole batch

Cases, in this order in every repetition and load model (the machine is shared; interleaving
spreads its noise):
  static        static batches, 8 adapters
  continuous    continuous batching, 8 adapters
  cont-one      continuous batching, every request on a0
Reported: generated tokens/s (completion tokens / wall time from the first request to the last
answer), p50 time to first token (first non-empty text chunk, client side), p50 request latency;
medians over repetitions, and each ratio as the median of its per-repetition ratios.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import serve as base  # bench/serve.py: the model, adapters and server process

VOCAB = 4096
CASES = [("static", "static", True), ("continuous", "continuous", True), ("cont-one", "continuous", False)]
# --ragged: also the continuous server on the flattened KV cache under a 4-D mask (ragged.py, the layout
# before per-row slots), 8 adapters, interleaved with the others: the before/after of slots.py
RAGGED = ("cont-ragged", "continuous-ragged", True)


def make_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(path)


def load_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=path, unk_token="t1", pad_token="t0")


def start(d: str, batching: str, a) -> tuple[subprocess.Popen, str]:
    port_file = os.path.join(d, f"url-{batching}")
    proc = subprocess.Popen([sys.executable, base.__file__, "--compare", "--_serve", d, port_file, batching,
                             "--threads", str(a.threads), "--window-ms", str(a.window_ms)])
    deadline = time.time() + 300
    while not os.path.exists(port_file) or not open(port_file).read():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the {batching} server did not start")
        time.sleep(0.2)
    return proc, open(port_file).read()


def one(client, model: str, ids: list[int], new: int) -> tuple[float, float, int]:
    """(time to first token, latency, completion tokens) of one streaming request."""
    body = {"model": model, "prompt": ids, "max_tokens": new, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, toks = None, 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            assert "error" not in d, d
            if first is None and d["choices"] and d["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if d.get("usage"):
                toks = d["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - t0), time.perf_counter() - t0, toks


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of process ``pid`` so far, summed per thread name (Linux /proc;
    {} elsewhere): the model thread (deltatune-model_0) against the rest (event loop, HTTP)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def round_(url: str, mixed: bool, seed: int, a, rate: float | None = None, pid: int | None = None) -> dict:
    """One round: the closed loop (``rate`` None) or Poisson arrivals at ``rate`` requests/s."""
    import httpx

    cpu0 = thread_cpu(pid) if pid else {}
    rng = random.Random(seed)
    reqs = [([(17 * i + k + seed) % 4000 + 3 for k in range(16)], rng.randint(8, 64)) for i in range(a.requests)]
    model = (lambda i: f"a{i % base.N_ADAPTERS}") if mixed else (lambda i: "a0")

    def client(c: int) -> list[tuple[float, float, int]]:
        with httpx.Client(base_url=url, timeout=600) as h:
            return [one(h, model(i), *reqs[i]) for i in range(c, a.requests, a.clients)]

    def arrival(i: int, at: float) -> list[tuple[float, float, int]]:
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        with httpx.Client(base_url=url, timeout=600) as h:
            return [one(h, model(i), *reqs[i])]

    t0 = time.perf_counter()
    if rate is None:
        with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:
            res = [x for part in pool.map(client, range(a.clients)) for x in part]
    else:
        gaps = random.Random(1000 + seed)
        at = [0.0]
        for _ in range(a.requests - 1):
            at.append(at[-1] + gaps.expovariate(rate))
        with concurrent.futures.ThreadPoolExecutor(a.requests) as pool:
            res = [x for part in pool.map(arrival, range(a.requests), at) for x in part]
    wall = time.perf_counter() - t0
    cpu1 = thread_cpu(pid) if pid else {}
    model_cpu = sum(v - cpu0.get(k, 0.0) for k, v in cpu1.items() if k.startswith("deltatune-model"))
    rest_cpu = sum(v - cpu0.get(k, 0.0) for k, v in cpu1.items() if not k.startswith("deltatune-model"))
    return {"tok_s": sum(r[2] for r in res) / wall, "ttft": [r[0] for r in res], "lat": [r[1] for r in res],
            "tokens": sum(r[2] for r in res), "model_cpu": model_cpu, "rest_cpu": rest_cpu}


def report(load: str, results: dict[str, list[dict]]) -> None:
    """The table and the three ratios of one load model (ratios: median of per-repetition ratios)."""
    p50 = statistics.median
    med = {n: {"tok_s": p50(r["tok_s"] for r in rs), "ttft": p50(t for r in rs for t in r["ttft"]),
               "lat": p50(t for r in rs for t in r["lat"]),
               "model": p50(1000 * r["model_cpu"] / max(r["tokens"], 1) for r in rs),
               "rest": p50(1000 * r["rest_cpu"] / max(r["tokens"], 1) for r in rs)} for n, rs in results.items()}
    print(f"\n{load}\n| case | generated tok/s | p50 time to first token (ms) | p50 latency (ms) "
          "| CPU ms/token: model thread | other threads |")
    print("|---|---|---|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m['tok_s']:.1f} | {m['ttft'] * 1000:.0f} | {m['lat'] * 1000:.0f} | {m['model']:.2f} "
              f"| {m['rest']:.2f} |")
    c, s, o = results["continuous"], results["static"], results["cont-one"]

    def ratio(xs, ys, f):
        per = [f(x) / f(y) for x, y in zip(xs, ys)]
        return p50(per), ", ".join(f"{r:.2f}" for r in per)

    lines = {"throughput continuous / static": (c, s, lambda r: r["tok_s"], ">= 2"),
             "p50 TTFT continuous / static": (c, s, lambda r: p50(r["ttft"]), "<= 0.333"),
             "p50 latency continuous / static": (c, s, lambda r: p50(r["lat"]), "(no target)"),
             "continuous 8 adapters / one adapter": (c, o, lambda r: r["tok_s"], ">= 0.9")}
    if "cont-ragged" in results:
        g = results["cont-ragged"]
        lines["throughput continuous on the flattened cache / static"] = (g, s, lambda r: r["tok_s"], "(before)")
        lines["throughput continuous slots / flattened"] = (c, g, lambda r: r["tok_s"], "(no target)")
    for label, (xs, ys, f, target) in lines.items():
        m, per = ratio(xs, ys, f)
        print(f"{label}: {m:.3f} (reps: {per}; target {target})")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48, help="requests per round")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--request-rate", type=float, default=None,
                    help="also run an open loop: Poisson arrivals at this many requests/s (seeded)")
    ap.add_argument("--ragged", action="store_true",
                    help="also a continuous server on the flattened 4-D-mask cache (the layout before slots.py)")
    ap.add_argument("--_serve", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cases = CASES + [RAGGED] if a.ragged else CASES
    if a._serve:
        d, port_file, batching = a._serve
        if batching == "continuous-ragged":
            from deltatune.serve import batching as serve_batching
            from deltatune.serve.ragged import RaggedCache

            serve_batching.LAYOUTS, batching = (RaggedCache,), "continuous"
        return base.serve(d, a.window_ms, port_file, a.threads, 16, batching, load_tokenizer(os.path.join(d, "tok.json")))
    import httpx

    loads = [(f"closed loop, {a.clients} clients", None)]
    if a.request_rate:
        loads.append((f"open loop, Poisson {a.request_rate:g} requests/s", a.request_rate))
    with tempfile.TemporaryDirectory() as d:
        base.make_adapters(d)
        make_tokenizer(os.path.join(d, "tok.json"))
        procs = {}
        try:
            for b in dict.fromkeys(b for _, b, _ in cases):
                procs[b] = start(d, b, a)
            for _, url in procs.values():  # warm-up: first calls build caches and stacks
                with httpx.Client(base_url=url, timeout=300) as h:
                    one(h, "a0", list(range(3, 19)), 4)
            results = {load: {name: [] for name, _, _ in cases} for load, _ in loads}
            for rep in range(a.reps):
                for load, rate in loads:
                    for name, b, mixed in cases:
                        r = round_(procs[b][1], mixed, seed=rep, a=a, rate=rate, pid=procs[b][0].pid)
                        results[load][name].append(r)
                        per = 1000 / max(r["tokens"], 1)
                        print(f"rep {rep} {load[:6]} {name:>10}: {r['tok_s']:7.1f} tok/s, p50 TTFT "
                              f"{statistics.median(r['ttft']) * 1000:6.0f} ms, p50 latency "
                              f"{statistics.median(r['lat']) * 1000:6.0f} ms, {r['tokens']} tokens, CPU ms/token: "
                              f"model thread {r['model_cpu'] * per:.2f}, other threads {r['rest_cpu'] * per:.2f}",
                              flush=True)
        finally:
            for p, _ in procs.values():
                p.terminate()
                p.wait(30)
    for load, res in results.items():
        report(load, res)


if __name__ == "__main__":
    main(sys.argv[1:])
