"""Soak test of ``deltatune serve``: 64 clients for a while, hostile requests every few seconds,
adapters loaded and deleted meanwhile; counts 5xx and wrong answers and samples the server's RSS.

    .venv/bin/python bench/soak_serve.py [--seconds 600] [--clients 64] [--poison-every 2]

The server runs in a subprocess (127.0.0.1, one torch thread) with a small random Llama (hidden 64,
2 layers, vocab 512, 128 positions), a word tokenizer, LoRA adapters a0..a3 and "churn", plus
hostile adapter directories (FIFO weights, r=3e6, JSON nested 100,000 deep, a symlink leaving the
directory).  A forward hook makes the model raise on token 511, as a model bug would: a request
holding it must fail alone (500) while the requests batched with it still answer correctly.

Every good answer is compared with the library's greedy output for that adapter and prompt,
computed beforehand in this process.  Poison (one every ``--poison-every`` seconds, in turn): a
prompt longer than the context, a 10 MB text, a lone surrogate, ``DELETE /v1/adapters/a0%0A``,
broken JSON, out-of-vocabulary ids, loading each hostile adapter, and the token-511 row.  Exit
status 1 if any good request got a 5xx or a wrong answer, or a poison request a 5xx (other than
the token-511 row's own 500).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "soak-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADAPTERS = ["a0", "a1", "a2", "a3"]
POISON_ID = 511
NEW = 4  # tokens generated per good request


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(500)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def make_adapters(d: str) -> None:
    import torch

    import deltatune as dt

    m = build_model()
    for i, name in enumerate(ADAPTERS + ["churn"]):
        dt.attach(m, "lora", name=name, r=4, targets=["q_proj", "v_proj"])
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for t in dt.adapter_tensors(m, name).values():
                t.add_(torch.randn(t.shape, generator=g) * 0.3)
        dt.save(m, os.path.join(d, name), name=name)
    hostile = dt.save(dt.attach(build_model(), "lora", targets=["q_proj"], name="h"), os.path.join(d, "fifo"), name="h")
    os.unlink(os.path.join(hostile, "adapter_model.safetensors"))
    os.mkfifo(os.path.join(hostile, "adapter_model.safetensors"))
    for name, text in [("huge_rank", None), ("deep", "[" * 100_000 + "]" * 100_000)]:
        p = dt.save(dt.attach(build_model(), "lora", targets=["q_proj"], name="h"), os.path.join(d, name), name="h")
        os.unlink(os.path.join(p, "deltatune.json"))
        cfg_path = os.path.join(p, "adapter_config.json")
        cfg = json.load(open(cfg_path))
        with open(cfg_path, "w") as f:
            f.write(text if text is not None else json.dumps({**cfg, "r": 3_000_000}))
    outside = dt.save(dt.attach(build_model(), "lora", targets=["q_proj"], name="h"), d + "-outside", name="h")
    os.symlink(outside, os.path.join(d, "escape"))


def serve(d: str, url_file: str) -> None:
    import logging

    import torch

    from deltatune.serve.app import ServerThread, build_app

    torch.set_num_threads(1)
    logging.getLogger("deltatune.serve").setLevel(logging.CRITICAL)  # the hostile inputs are expected
    model = build_model()

    def poison(module, args, kwargs):  # a model bug that only some rows trigger
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1 and bool((ids == POISON_ID).any()):
            raise RuntimeError("poisoned row")

    model.register_forward_pre_hook(poison, with_kwargs=True)
    app = build_app(model, build_tokenizer(), d, token=TOKEN, window_ms=10, max_batch=16, max_new_tokens=16)
    with ServerThread(app) as srv:
        with open(url_file, "w") as f:
            f.write(srv.url)
        while srv.thread.is_alive():
            time.sleep(0.5)


def references(d: str, n: int) -> list[tuple]:
    """(adapter, prompt ids, expected output ids) for n requests: the library's greedy answers."""
    import torch

    import deltatune as dt

    ref = build_model()
    for name in ADAPTERS + ["churn"]:
        dt.load(ref, os.path.join(d, name), name=name)
    rng, out = random.Random(0), []
    for i in range(n):
        adapter = (ADAPTERS + ["churn", None])[i % 6]
        ids = [rng.randrange(3, 500) for _ in range(rng.randrange(3, 24))]
        with torch.no_grad():
            if adapter is None:
                with dt.disabled(ref):
                    y = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
            else:
                dt.activate(ref, adapter)
                y = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        toks = y[0, len(ids):].tolist()
        out.append((adapter, ids, toks[:toks.index(2)] if 2 in toks else toks))
    return out


POISONS = [  # (name, method, path, json body or raw bytes, headers?, expected statuses)
    ("over_context", "POST", "/v1/generate", {"input_ids": [5] * 120, "max_new_tokens": 16}, False, {413}),
    ("10MB_text", "POST", "/v1/generate", {"prompt": "w1 " * 3_500_000}, False, {413}),
    ("lone_surrogate", "POST", "/v1/generate", b'{"prompt": "w1 \\ud800", "max_new_tokens": 2}', False, {400}),
    ("delete_a0_newline", "DELETE", "/v1/adapters/a0%0A", None, True, {400}),
    ("broken_json", "POST", "/v1/generate", b'{"input_ids": [1,', False, {422}),
    ("out_of_vocab", "POST", "/v1/generate", {"input_ids": [5, 10**9]}, False, {400}),
    ("load_fifo", "POST", "/v1/adapters", {"name": "fifo"}, True, {422}),
    ("load_rank_3e6", "POST", "/v1/adapters", {"name": "huge_rank"}, True, {422}),
    ("load_deep_json", "POST", "/v1/adapters", {"name": "deep"}, True, {422}),
    ("load_escape", "POST", "/v1/adapters", {"name": "escape"}, True, {400}),
]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--poison-every", type=float, default=2.0, help="seconds between hostile requests")
    ap.add_argument("--churn-every", type=float, default=1.0, help="seconds between adapter delete/load")
    ap.add_argument("--_serve", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._serve:
        serve(*a._serve)
        return 0
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "adapters")
        make_adapters(d)
        pairs = references(d, 96)
        url_file = os.path.join(tmp, "url")
        proc = subprocess.Popen([sys.executable, __file__, "--_serve", d, url_file])
        try:
            deadline = time.time() + 300
            while not os.path.exists(url_file) or not open(url_file).read():
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            url = open(url_file).read()
            return soak(url, proc.pid, pairs, a, httpx)
        finally:
            proc.terminate()
            proc.wait(30)


def soak(url: str, pid: int, pairs: list[tuple], a, httpx) -> int:
    stop = threading.Event()
    lock = threading.Lock()
    good = collections.Counter()  # status -> count
    wrong, isolation, poison_seen, latencies = [], collections.Counter(), collections.defaultdict(collections.Counter), []
    rss = []  # (seconds since start, MB)

    def client(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(base_url=url, timeout=300) as c:
            while not stop.is_set():
                adapter, ids, want = pairs[rng.randrange(len(pairs))]
                t0 = time.perf_counter()
                r = c.post("/v1/generate", json={"adapter": adapter, "input_ids": ids, "max_new_tokens": NEW})
                dt_ = time.perf_counter() - t0
                with lock:
                    good[r.status_code] += 1
                    latencies.append(dt_)
                    ok = r.status_code == 200 and r.json()["output_ids"] == want
                    if not ok and not (adapter == "churn" and r.status_code == 404):
                        wrong.append((adapter, ids, r.status_code, r.text[:200]))

    def poisoner() -> None:
        i = 0
        with httpx.Client(base_url=url, timeout=300) as c:
            while not stop.wait(a.poison_every):
                if i % (len(POISONS) + 1) == 0:  # the model-bug row, batched with good ones
                    r = c.post("/v1/generate", json={"input_ids": [7, POISON_ID, 9], "max_new_tokens": 2})
                    with lock:
                        isolation[r.status_code] += 1
                else:
                    name, method, path, body, auth, want = POISONS[i % (len(POISONS) + 1) - 1]
                    kw = {"content": body, "headers": {"Content-Type": "application/json"}} \
                        if isinstance(body, bytes) else {"json": body}
                    if auth:
                        kw["headers"] = {**kw.get("headers", {}), **AUTH}
                    r = c.request(method, path, **kw)
                    with lock:
                        poison_seen[name][r.status_code] += 1
                i += 1

    def churner() -> None:
        with httpx.Client(base_url=url, timeout=300, headers=AUTH) as c:
            while not stop.wait(a.churn_every):
                for r in (c.delete("/v1/adapters/churn"), c.post("/v1/adapters", json={"name": "churn"})):
                    with lock:
                        poison_seen["churn_" + r.request.method.lower()][r.status_code] += 1

    t_start = time.time()

    def sampler() -> None:
        while not stop.wait(5.0):
            rss.append((time.time() - t_start, rss_kb(pid) / 1024))

    rss.append((0.0, rss_kb(pid) / 1024))
    threads = [threading.Thread(target=f, daemon=True) for f in [poisoner, churner, sampler]]
    with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:
        futs = [pool.submit(client, k) for k in range(a.clients)]
        for t in threads:
            t.start()
        time.sleep(a.seconds)
        stop.set()
        for f in futs:
            f.result()
    for t in threads:
        t.join(60)
    rss.append((time.time() - t_start, rss_kb(pid) / 1024))
    with httpx.Client(base_url=url, timeout=60) as c:
        health = c.get("/health").status_code

    n = sum(good.values())
    lat = sorted(latencies)
    good_5xx = sum(v for s, v in good.items() if s >= 500)
    poison_5xx = sum(v for name, cnt in poison_seen.items() for s, v in cnt.items() if s >= 500)
    unexpected = {name: dict(cnt) for name, cnt in poison_seen.items() if not name.startswith("churn")
                  and set(cnt) - next(p[5] for p in POISONS if p[0] == name)}
    warm = [mb for t, mb in rss if t >= min(60.0, a.seconds / 2)] or [rss[-1][1]]
    print(f"good requests: {n} ({n / a.seconds:.1f}/s), statuses {dict(good)}, 5xx {good_5xx}, wrong answers "
          f"{len(wrong)}; p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(0.99 * (len(lat) - 1))] * 1000:.0f} ms")
    churn = sum(sum(c.values()) for k, c in poison_seen.items() if k.startswith("churn"))
    hostile = sum(sum(c.values()) for k, c in poison_seen.items() if not k.startswith("churn"))
    print(f"poison: {hostile} hostile requests + {sum(isolation.values())} model-bug rows {dict(isolation)} (500 "
          f"expected, alone), {churn} adapter deletes/loads; 5xx {poison_5xx}, unexpected statuses {unexpected or 'none'}")
    print("poison statuses: " + ", ".join(f"{k} {dict(v)}" for k, v in sorted(poison_seen.items())))
    print(f"server RSS MB: start {rss[0][1]:.0f}, after warm-up {warm[0]:.0f}, max {max(m for _, m in rss):.0f}, "
          f"end {rss[-1][1]:.0f} ({len(rss)} samples); /health at the end: {health}")
    for w in wrong[:5]:
        print("WRONG:", w)
    bad = good_5xx or wrong or poison_5xx or unexpected or set(isolation) - {500} or health != 200
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
