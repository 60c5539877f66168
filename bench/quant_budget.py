"""The largest Llama that LoRA-trains within a memory budget, fp32 vs NF4 QLoRA (issue 18).

    .venv/bin/python bench/quant_budget.py --budget 4GiB            # search both arms -> docs/benchmarks.md
    .venv/bin/python bench/quant_budget.py --budget 4GiB --arms nf4 # one arm
    .venv/bin/python bench/quant_budget.py --render                 # docs from bench/results/quant-budget.json

Each probe is the user's path of bench/quant.py (its ``worker``): one process loads a checkpoint
from disk the arm's way, attaches LoRA r=8 on q_proj, v_proj, and runs 2 AdamW steps on one 1×512
random token batch with the CLI's small-memory defaults (``dt.chunked_causal_lm_loss``; gradient
checkpointing, as ``deltatune train`` turns it on for these shapes):

    fp32  ``LlamaForCausalLM.from_pretrained(dir, dtype=float32)`` on an fp32 checkpoint (memory-mapped:
          the weights are file pages; a bf16 file would be converted into anonymous memory instead)
    nf4   ``dt.load_quantized(dir, "nf4")`` on a bf16 checkpoint (the loader casts each tensor to fp32
          before quantizing, so the model in memory is the one an fp32 file gives; bf16 halves disk
          and writing time)

The checkpoint is written by a separate short process (so the writer's memory is not the probe's)
into /tmp and deleted after the probe.  Memory of a probe, the whole process:

    peak = peak anonymous pages (sampled every 2 ms, libraries and interpreter included)
           + file pages still mapped at the end (shared libraries, and the fp32 checkpoint)

Transient file pages of a shard being read are not counted: they are clean page cache the kernel
drops under pressure.  Anonymous pages cannot be dropped (the machine has no swap), so the budget is
*enforced* on them: a watchdog reads the probe's /proc/<pid>/status every 10 ms and kills it once
RssAnon exceeds the budget, as the OOM killer of a memory-limited container would.  A cgroup limit
was not used: the cgroup (v1) memory hierarchy on this machine belongs to the sandbox running the
session; ``RLIMIT_AS`` is wrong for the fp32 arm (its address space holds the whole mapped file and
torch's reserved arenas).

The search, per arm: measure a few sizes of one Llama family (``FAMILY``: head dim 128, 4 query heads
per KV head, MLP ≈ 2.7×hidden, untied 32k vocabulary; hidden 2048 → 2560 → 3072 as layers grow), fit
peak ≈ a + b·params, then probe the largest member the fit puts within the budget, walk down while
it fails and up while the next one fits, and show the next member fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant  # noqa: E402  (bench/quant.py: the worker, the writer, the docs helpers)

ROOT = quant.ROOT
RESULTS = quant.RESULTS / "quant-budget.json"
SUBSECTION = "### Largest model that trains within a memory budget"
VOCAB, SEQ = 32000, 512
# (hidden, intermediate, layers): width grows with depth as in Llama families; each member has
# more parameters than the one before (checked by ``family``)
WIDTHS = ((2048, 5632, range(2, 18, 2)), (2560, 6912, range(14, 26, 2)), (3072, 8192, range(20, 66, 2)))
# family indices measured for the fit (the defaults bracket a 2 GiB budget: 0.22/0.40B fp32, 0.31/0.76B
# NF4); --fit nf4=3,9 moves them (a larger budget needs larger points, the fit is only a first guess)
FIT = {"fp32": (0, 2), "nf4": (1, 6)}
ON_DISK = {"fp32": "float32", "nf4": "bfloat16"}


def shape(hidden: int, inter: int, layers: int) -> dict:
    heads = hidden // 128
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads // 4, tie_word_embeddings=False)


def n_params(s: dict) -> int:
    """Parameters of a ``shape`` (checked against transformers' count in --selftest)."""
    h, m, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = s["num_key_value_heads"] * 128
    layer = 2 * h * h + 2 * kv * h + 3 * h * m + 2 * h  # q,o; k,v; gate,up,down; two norms
    return 2 * VOCAB * h + h + L * layer  # embedding, head, final norm


def family() -> list[dict]:
    out = [shape(h, m, L) for h, m, Ls in WIDTHS for L in Ls]
    out = [s for i, s in enumerate(out) if all(n_params(s) > n_params(t) for t in out[:i])]
    return out


def parse_size(text: str) -> int:
    """'4GiB' / '3500MiB' / '4G' -> MiB."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    units = {"g": 1024, "m": 1}
    if not t or t[-1] not in units or not t[:-1].replace(".", "", 1).isdigit():
        raise SystemExit(f"--budget {text!r}: give a size like 4GiB or 3500MiB")
    return int(float(t[:-1]) * units[t[-1]])


def _env(threads: int) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _rss_anon_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def run_guarded(job: dict, budget_mib: int, threads: int) -> dict:
    """bench/quant.py's worker in its own process, killed once its anonymous memory passes the budget."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, quant.__file__, "--worker", json.dumps(job)], stdout=out, stderr=err,
                             env=_env(threads), cwd=ROOT, text=True)
        t0, high = time.perf_counter(), 0.0
        while p.poll() is None:
            high = max(high, _rss_anon_mib(p.pid))
            if high > budget_mib:
                p.kill()
                p.wait()
                return {"killed": True, "anon_at_kill": high, "seconds": time.perf_counter() - t0}
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            return {"error": f"exit {p.returncode}: " + " | ".join(err.read().strip().splitlines()[-3:])[:300]}
        res = json.loads(lines[-1])
    end = res["phases"][-1]
    # absolute anonymous pages = the end's absolute RssAnon minus the end's value above the import baseline
    base_anon = res["rss"]["RssAnon"] / 1024 - end["anon_mib"]
    res["anon_peak_abs"], res["file_end_abs"] = base_anon + res["peak_anon"], res["rss"]["RssFile"] / 1024
    res["whole_peak"] = res["anon_peak_abs"] + res["file_end_abs"]
    res["seconds"] = time.perf_counter() - t0
    return res


def probe(arm: str, idx: int, budget_mib: int, threads: int, log) -> dict:
    """Write member ``idx`` of the family, train it the arm's way, delete it."""
    s = family()[idx]
    tmp = Path(tempfile.mkdtemp(prefix="dt-budget-", dir="/tmp"))
    row = {"arm": arm, "idx": idx, "shape": s, "params": n_params(s)}
    try:
        t = time.perf_counter()
        w = subprocess.run([sys.executable, __file__, "--write", json.dumps({"dir": str(tmp), "shape": s,
                           "dtype": ON_DISK[arm]})], env=_env(threads), cwd=ROOT, capture_output=True, text=True)
        if w.returncode:
            raise SystemExit(f"writing {s} failed: {w.stderr.strip().splitlines()[-1:]}")
        row["disk_gib"] = sum(f.stat().st_size for f in tmp.iterdir()) / 2**30
        row["write_s"] = time.perf_counter() - t
        res = run_guarded({"arm": arm, "dir": str(tmp), "batch": 1, "seq": SEQ, "steps": 1, "threads": threads,
                           "checkpointing": True}, budget_mib, threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row.update({k: res[k] for k in ("killed", "anon_at_kill", "error", "whole_peak", "anon_peak_abs", "file_end_abs",
                                    "peak_anon", "mapped", "import_anon_mib", "steps", "seconds") if k in res})
    row["fits"] = "whole_peak" in row and row["whole_peak"] <= budget_mib
    log(f"{arm} #{idx} {row['params'] / 1e9:.2f}B (h{s['hidden_size']} L{s['num_hidden_layers']}, "
        f"{row['disk_gib']:.1f} GiB {ON_DISK[arm]}): " + json.dumps({k: row.get(k) for k in (
            "whole_peak", "peak_anon", "mapped", "killed", "anon_at_kill", "error", "fits", "seconds")}))
    return row


def search(arm: str, budget_mib: int, threads: int, log) -> dict:
    """Fit a + b·params on FIT[arm], then find the largest member that fits by real probes."""
    fam, rows = family(), {}

    def run(i: int) -> dict:
        if i not in rows:
            rows[i] = probe(arm, i, budget_mib, threads, log)
        return rows[i]

    pts = [(run(i)["params"], run(i)["whole_peak"]) for i in FIT[arm] if "whole_peak" in run(i)]
    if len(pts) < 2:
        return {"arm": arm, "probes": list(rows.values()), "error": "fewer than 2 fit sizes trained"}
    b, a = statistics.linear_regression([p for p, _ in pts], [m for _, m in pts])
    predicted = max((i for i, s in enumerate(fam) if a + b * n_params(s) <= budget_mib), default=0)
    i = predicted
    while i > 0 and not run(i)["fits"]:  # the fit was optimistic: walk down
        i -= 1
    while i + 1 < len(fam) and run(i)["fits"] and run(i + 1)["fits"]:  # pessimistic: walk up
        i += 1
    if not run(i)["fits"]:
        return {"arm": arm, "probes": list(rows.values()), "error": "no family member fits"}
    above = run(i + 1) if i + 1 < len(fam) else None
    return {"arm": arm, "fit": {"a_mib": a, "mib_per_bparam": b * 1e9, "points": len(pts)},
            "predicted_idx": predicted, "largest_idx": i, "largest": rows[i], "above": above,
            "probes": sorted(rows.values(), key=lambda r: r["idx"])}


# --------------------------------------------------------------------------- docs

def _row(r: dict | None, budget_mib: int) -> str:
    if r is None:
        return "– (end of the family)"
    s = r["shape"]
    head = f"{r['params'] / 1e9:.2f}B (hidden {s['hidden_size']}, {s['num_hidden_layers']} layers)"
    if r.get("killed"):
        return f"{head}: killed, anonymous memory {r['anon_at_kill']:.0f} MiB > {budget_mib} MiB after {r['seconds']:.0f} s"
    if "error" in r:
        return f"{head}: failed ({r['error'][:80]})"
    return (f"{head}: {r['whole_peak']:.0f} MiB ({r['anon_peak_abs']:.0f} anonymous + {r['file_end_abs']:.0f} "
            f"file pages), {'fits' if r['fits'] else 'over the budget'}")


def render(res: dict) -> list[str]:
    m, budget = res["meta"], res["budget_mib"]
    out = [SUBSECTION, "",
           f"Command: `.venv/bin/python {m['command']}` ({m['date']}, {m['cpu']}, load average {m['load_start']:.1f} at "
           f"the start and {m['load_end']:.1f} at the end on 2 cores; {m['seconds'] / 60:.0f} min). Budget {budget} MiB "
           "for the whole process: peak anonymous memory (interpreter and libraries included) + file pages "
           "mapped at the end (shared libraries; the fp32 checkpoint). Batch 1×512, LoRA r=8 on q_proj, v_proj, "
           "AdamW, chunked loss, gradient checkpointing, 2 steps; fp32 checkpoints written as fp32, NF4 ones as "
           "bf16 (cast to fp32 by the loader before quantizing). Anonymous memory over the budget kills the "
           "probe (watchdog on /proc/<pid>/status, 10 ms); no cgroup limit (see bench/quant_budget.py).", "",
           "| arm | fit: peak MiB ≈ a + b·params | largest that trains within the budget | next size up |",
           "|---|---|---|---|"]
    largest = {}
    for arm, r in res["arms"].items():
        if "error" in r:
            out.append(f"| {arm} | – | not found: {r['error']} | – |")
            continue
        f = r["fit"]
        largest[arm] = r["largest"]["params"]
        out.append(f"| {arm} | {f['a_mib']:.0f} + {f['mib_per_bparam']:.0f}·(params/1e9) ({f['points']} sizes; "
                   f"predicted largest #{r['predicted_idx']}) | {_row(r['largest'], budget)} | {_row(r['above'], budget)} |")
    if len(largest) == 2:
        out += ["", f"Largest trainable model, NF4 / fp32: **{largest['nf4'] / largest['fp32']:.2f}×** the parameters "
                f"({largest['nf4'] / 1e9:.2f}B vs {largest['fp32'] / 1e9:.2f}B)."]
    fits = {arm: r["fit"] for arm, r in res["arms"].items() if "fit" in r}
    if fits:
        out += ["", "Per billion parameters the fits charge " + ", ".join(
            f"{arm} {f['mib_per_bparam']:.0f} MiB ({f['mib_per_bparam'] * 2**20 / 1e9:.2f} bytes/param)" for arm, f in fits.items())
            + "; the intercept is the process without a model (interpreter, torch, transformers, bitsandbytes) plus "
            "what does not scale with depth. Extrapolated by the same fits, not probed: at "
            f"{2 * budget} MiB " + ", ".join(f"{arm} ≈ {(2 * budget - f['a_mib']) / f['mib_per_bparam']:.1f}B"
                                             for arm, f in fits.items()) + "."]
    out += ["", "Every probe (params, whole-process peak MiB or what stopped it, seconds including the 2 steps):", ""]
    for arm, r in res["arms"].items():
        cells = [f"{p['params'] / 1e9:.2f}B " + (f"{p['whole_peak']:.0f}" if "whole_peak" in p else
                 "killed" if p.get("killed") else "failed") + f" ({p.get('seconds', 0):.0f} s)" for p in r["probes"]]
        out.append(f"- {arm}: " + ", ".join(cells))
    return out + [""]


def write_docs(lines: list[str]) -> None:
    """Replace the budget subsection (or the 'not measured' line standing for it) in docs/benchmarks.md."""
    path = ROOT / "docs" / "benchmarks.md"
    doc, text = path.read_text(), "\n".join(lines)
    start = doc.find(SUBSECTION)
    if start < 0:
        start = doc.find("**Largest model within")
    if start < 0:
        raise SystemExit(f"{path}: neither '{SUBSECTION}' nor the 'Largest model within' line found; run bench/quant.py --render first")
    end = doc.find("\n### ", start + 1)
    path.write_text(doc[:start] + text.rstrip() + "\n" + (doc[end:] if end >= 0 else ""))


def selftest() -> None:
    """n_params against transformers' own count on the meta device, and the family is increasing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fam = family()
    for s in (fam[0], fam[-1]):
        with torch.device("meta"):
            m = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **s))
        assert sum(p.numel() for p in m.parameters()) == n_params(s), s
    assert all(n_params(a) < n_params(b) for a, b in zip(fam, fam[1:]))
    print(f"family of {len(fam)}: " + ", ".join(f"#{i} {n_params(s) / 1e9:.2f}B" for i, s in enumerate(fam)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="4GiB", help="memory budget of the whole process, e.g. 4GiB, 3500MiB")
    ap.add_argument("--arms", default="fp32,nf4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit", action="append", default=[], metavar="ARM=I,J",
                    help=f"family indices measured for the fit of ARM (default {FIT}); --selftest lists the family")
    ap.add_argument("--render", action="store_true", help="write the docs subsection from " + str(RESULTS.relative_to(ROOT)))
    ap.add_argument("--no-write", action="store_true", help="print the docs subsection only")
    ap.add_argument("--selftest", action="store_true", help="check the parameter formula and the family, then exit")
    ap.add_argument("--write", help=argparse.SUPPRESS)  # internal: the checkpoint writer's process
    a = ap.parse_args()
    if a.write:
        job = json.loads(a.write)
        quant.write_model(Path(job["dir"]), "", shape=job["shape"], dtype=job["dtype"])
        return
    if a.selftest:
        return selftest()
    if not a.render:
        budget = parse_size(a.budget)
        if budget > 6 * 1024:
            raise SystemExit(f"--budget {a.budget}: probes on this shared machine stay under 6 GiB; give at most 6GiB")
        for spec in a.fit:
            arm, _, idx = spec.partition("=")
            if arm not in FIT or len(idx.split(",")) < 2 or not idx.replace(",", "").isdigit():
                raise SystemExit(f"--fit {spec!r}: give ARM=I,J with ARM in {sorted(FIT)} and two or more family indices")
            FIT[arm] = tuple(int(i) for i in idx.split(","))
        log = lambda msg: print(time.strftime("%H:%M:%S ") + msg, flush=True)  # noqa: E731
        t, load = time.perf_counter(), os.getloadavg()[0]
        arms = {arm: search(arm, budget, a.threads, log) for arm in a.arms.split(",")}
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": quant.cpu_model(),
                "load_start": load, "load_end": os.getloadavg()[0], "seconds": time.perf_counter() - t,
                "command": " ".join(["bench/quant_budget.py"] + sys.argv[1:])}
        quant.RESULTS.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"meta": meta, "budget_mib": budget, "arms": arms}, indent=1))
    lines = render(json.loads(RESULTS.read_text()))
    print("\n".join(lines))
    if not a.no_write:
        write_docs(lines)


if __name__ == "__main__":
    main()
