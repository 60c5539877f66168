"""Load benchmark of ``deltatune serve``, over HTTP on loopback, two modes:

    .venv/bin/python bench/serve.py --compare [--reps 3] [--requests 48] [--request-rate 4]   # issue 17
    .venv/bin/python bench/serve.py [--levels 1,4,16] [--new-tokens 8] [--max-batch 16]

``--compare`` (serve_compare.py): 16 concurrent streaming clients of /v1/completions (closed
loop) and, with ``--request-rate R``, Poisson arrivals at R requests/s (open loop, as vLLM's
``benchmark_serving.py``), max_tokens drawn from 8-64 per request, interleaved rounds against two
servers of the same model and adapters, one with continuous batching, one with static batches:
generated tokens/s, time to first token, latency, and continuous batching over 8 adapters vs the
same load on one adapter.
The default mode: requests/s and p50/p99 latency for 1, 4 and 16 concurrent clients, each
request for one of 8 LoRA adapters (round-robin).

The server runs in a subprocess (so client threads do not share its GIL) on 127.0.0.1 with a
small random Llama (hidden 256, 4 layers, vocab 4096; 8 LoRA r=8 adapters on q,k,v,o) and
greedy generation of ``--new-tokens`` tokens from 16-token prompts.  Each concurrency level sends
a bounded number of requests; the mean batch size comes from the server's /metrics.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time

N_ADAPTERS = 8


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def make_adapters(d: str) -> None:
    import torch

    import deltatune as dt

    m = build_model()
    for i in range(N_ADAPTERS):
        dt.attach(m, "lora", name=f"a{i}", r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
        with torch.no_grad():
            for t in dt.adapter_tensors(m, f"a{i}").values():
                t.normal_(0, 0.05)
        dt.save(m, os.path.join(d, f"a{i}"), name=f"a{i}")


def name_threads() -> None:
    """Give each Python thread started from now on its name in the OS (Linux prctl), so the bench can
    read per-thread CPU time from /proc (Python 3.11 does not set native thread names)."""
    import ctypes
    import threading

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return
    run = threading.Thread.run

    def named_run(self):
        libc.prctl(15, self.name[:15].encode(), 0, 0, 0)  # PR_SET_NAME
        return run(self)

    threading.Thread.run = named_run


def serve(d: str, window_ms: float, port_file: str, threads: int, max_batch: int, batching: str = "continuous",
          tokenizer=None) -> None:
    import torch

    from deltatune.serve.app import ServerThread, build_app

    torch.set_num_threads(threads)
    name_threads()
    app = build_app(build_model(), tokenizer, d, window_ms=window_ms, max_batch=max_batch, batching=batching)
    with ServerThread(app) as srv:
        with open(port_file, "w") as f:
            f.write(srv.url)
        while srv.thread.is_alive():
            time.sleep(0.5)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    if "--compare" in sys.argv:
        import serve_compare

        return serve_compare.main(sys.argv[1:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16, help="1 = no batching (the comparison row)")
    ap.add_argument("--_serve", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._serve:
        return serve(a._serve[0], a.window_ms, a._serve[1], a.threads, a.max_batch)
    import httpx

    with tempfile.TemporaryDirectory() as d:
        make_adapters(d)
        port_file = os.path.join(d, "url")
        proc = subprocess.Popen([sys.executable, __file__, "--window-ms", str(a.window_ms), "--threads",
                                 str(a.threads), "--max-batch", str(a.max_batch), "--_serve", d, port_file])
        try:
            deadline = time.time() + 300
            while not os.path.exists(port_file) or not open(port_file).read():
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            url = open(port_file).read()
            prompts = [[(17 * i + k) % 4000 + 3 for k in range(16)] for i in range(a.requests)]
            rows = []
            for level in (int(x) for x in a.levels.split(",")):
                with httpx.Client(base_url=url, timeout=300) as c:  # warm-up
                    c.post("/v1/generate", json={"adapter": "a0", "input_ids": prompts[0], "max_new_tokens": 2})
                    m0 = c.get("/metrics").text

                def send(i):
                    with httpx.Client(base_url=url, timeout=300) as c:
                        t0 = time.perf_counter()
                        r = c.post("/v1/generate", json={"adapter": f"a{i % N_ADAPTERS}", "input_ids": prompts[i],
                                                          "max_new_tokens": a.new_tokens})
                        assert r.status_code == 200, r.text
                        return time.perf_counter() - t0

                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(level) as pool:
                    lat = sorted(pool.map(send, range(a.requests)))
                wall = time.perf_counter() - t0
                with httpx.Client(base_url=url, timeout=60) as c:
                    m1 = c.get("/metrics").text
                calls = metric(m1, "deltatune_batch_size_count") - metric(m0, "deltatune_batch_size_count")
                rows_ = metric(m1, "deltatune_batch_size_sum") - metric(m0, "deltatune_batch_size_sum")
                p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
                rows.append((level, a.requests / wall, statistics.median(lat), p99, rows_ / max(calls, 1)))
                print(f"{level:>2} clients: {rows[-1][1]:.2f} req/s, p50 {rows[-1][2] * 1000:.0f} ms, "
                      f"p99 {p99 * 1000:.0f} ms, mean batch {rows[-1][4]:.2f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print("| clients | requests/s | p50 latency (ms) | p99 latency (ms) | mean batch size |")
    print("|---|---|---|---|---|")
    for level, rps, p50, p99, mb in rows:
        print(f"| {level} | {rps:.2f} | {p50 * 1000:.0f} | {p99 * 1000:.0f} | {mb:.2f} |")


if __name__ == "__main__":
    main()
