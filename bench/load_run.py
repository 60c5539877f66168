"""Load run of ``deltatune serve`` with locust (issue 17): N users for T minutes against the real CLI
server of a tiny random Llama with several adapters; every answer checked against the library's.

    pip install -e ".[load]"
    .venv/bin/python bench/load_run.py [--users 32] [--minutes 5] [--threads 1]

1. Builds the model (Llama, hidden 64, 2 layers, vocab 256) and 4 adapters: two LoRA (r=4, r=8),
   IA3 (these decode in the continuous batch) and a 4-token prompt adapter (static batches), each
   moved off its init; saves them with ``save_pretrained`` / ``dt.save``.
2. Precomputes 96 cases with the library (``model.generate`` on the prompt alone): adapter or
   bare base, 3-12-token prompts, max_new_tokens 4-32, greedy or seeded sampling (temperature 0.8,
   top_k 20 / top_p 0.9) - the answers any correct server must give whatever it batches together.
3. Starts ``deltatune serve`` (continuous batching) in a subprocess, runs
   ``locust --headless -u USERS -r USERS -t MINUTES`` with bench/locustfile.py, and samples the
   server's RSS (/proc/PID/status VmRSS) every 10 s.
4. Prints requests, 5xx, leaks (answers differing from the library's), other failures, p50/p99
   latency and the RSS series (first vs last minute).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ADAPTERS = {"lora4": ("lora", dict(r=4)), "lora8": ("lora", dict(r=8)), "ia3": ("ia3", {}),
            "prompt": ("prompt", dict(num_virtual_tokens=4))}
EOS = 2


def build(d: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d / "model")
    for i, (name, (method, opts)) in enumerate(ADAPTERS.items()):
        dt.attach(model, method, name=name, **opts)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for t in dt.adapter_tensors(model, name).values():
                t.add_(torch.randn(t.shape, generator=g) * 0.3)
        dt.save(model, d / "adapters" / name, name=name)
    return model


def cases(model, n: int = 96) -> list[dict]:
    import contextlib

    import torch

    import deltatune as dt

    rng = random.Random(0)
    out = []
    for i in range(n):
        adapter = rng.choice([*ADAPTERS, None])
        ids = [rng.randrange(3, 256) for _ in range(rng.randint(3, 12))]
        new = rng.randint(4, 32)
        req = {"adapter": adapter, "input_ids": ids, "max_new_tokens": new}
        kw = dict(do_sample=False)
        if i % 2:
            req.update(temperature=0.8, top_k=20, top_p=0.9, seed=rng.randrange(2**31))
            torch.manual_seed(req["seed"])
            kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
        ctx = dt.disabled(model) if adapter is None else contextlib.nullcontext()
        if adapter is not None:
            dt.activate(model, adapter)
        with torch.no_grad(), ctx:
            toks = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, pad_token_id=0, **kw)[0, len(ids):]
        toks = toks.tolist()
        out.append({"request": req, "expected": toks[:toks.index(EOS)] if EOS in toks else toks,
                    "kind": "sampled" if i % 2 else "greedy"})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = build(d)
        (d / "cases.json").write_text(json.dumps(cases(model)))
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        server = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--model", str(d / "model"),
                                   "--adapters", str(d / "adapters"), "--port", str(port), "--max-new-tokens", "64"],
                                  env={**env, "OMP_NUM_THREADS": str(a.threads)}, stdout=subprocess.DEVNULL,
                                  stderr=open(d / "server.log", "w"))
        try:
            import httpx

            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start:\n" + (d / "server.log").read_text()[-2000:])
                time.sleep(0.5)
            rss: list[tuple[float, float]] = []
            stop = threading.Event()
            t0 = time.time()

            def sample():
                while not stop.is_set():
                    rss.append((time.time() - t0, rss_mb(server.pid)))
                    stop.wait(10)

            threading.Thread(target=sample, daemon=True).start()
            subprocess.run([sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")),
                            "--headless", "-u", str(a.users), "-r", str(a.users), "-t", f"{int(a.minutes * 60)}s",
                            "--host", f"http://127.0.0.1:{port}", "--csv", str(d / "load"), "--only-summary",
                            "--loglevel", "WARNING"],
                           env={**env, "DELTATUNE_LOAD_CASES": str(d / "cases.json")}, check=False)
            stop.set()
            rss.append((time.time() - t0, rss_mb(server.pid)))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        stats = list(csv.DictReader(open(d / "load_stats.csv")))
        failures = list(csv.DictReader(open(d / "load_failures.csv")))
        total = next(r for r in stats if r["Name"] == "Aggregated")
        kinds = {"5xx": 0, "leak": 0, "status": 0}
        for f in failures:
            kinds[f["Error"].split()[0].rstrip(":")] = kinds.get(f["Error"].split()[0].rstrip(":"), 0) + int(f["Occurrences"])
        first = [m for t, m in rss if t <= 60]
        last = [m for t, m in rss if t >= rss[-1][0] - 60]
        print(f"requests {total['Request Count']}, failures {total['Failure Count']} "
              f"(5xx {kinds['5xx']}, leaks {kinds['leak']}, other {kinds['status']}), "
              f"{float(total['Requests/s']):.1f} req/s, p50 {total['50%']} ms, p99 {total['99%']} ms")
        print(f"server RSS: first minute {min(first):.0f}-{max(first):.0f} MB, last minute "
              f"{min(last):.0f}-{max(last):.0f} MB; series (s, MB): " +
              ", ".join(f"({t:.0f}, {m:.0f})" for t, m in rss))
        for r in stats:
            if r["Name"] != "Aggregated":
                print(f"  {r['Name']}: {r['Request Count']} requests, {r['Failure Count']} failures")


if __name__ == "__main__":
    main()
