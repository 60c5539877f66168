"""deltatune vs peft on the same random-init Llama-style models: training step time, peak RSS,
inference latency, and the naive frozen-base floor.

    .venv/bin/python bench/run.py              # full suite (≈42 M and ≈110 M models)
    .venv/bin/python bench/run.py --quick      # one size, LoRA q,v only, 3 timed rounds (~2 min)
    .venv/bin/python bench/run.py --ablation   # the LoRA optimisations one by one

Times: every configuration of a group runs round-robin in one process (A/B/A/B, order rotated
each round) and ratios are the median over rounds of the paired per-round ratios, so the load of a
shared machine cancels out.  Memory: one subprocess per configuration; peak RSS (VmHWM) above the
RSS measured after imports, before the model is built.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- groups

def train_group(size, method, args):
    """{label: step}: the floor, deltatune and peft (or HF full FT) for one method."""
    ids = C.batch(args.batch, args.seq)
    steps = {"floor": C.floor_step(C.make_model(size), ids),
             "deltatune": C.dt_step(C.make_model(size), method, ids, chunk=args.chunk),
             "peft": C.peft_step(C.make_model(size), method, ids)}
    return steps


def custom_group(size, entries, args):
    """``floor``, ``deltatune:METHOD`` or ``peft:METHOD`` entries, all in one interleaved group."""
    ids = C.batch(args.batch, args.seq)
    make = {"deltatune": lambda m: C.dt_step(C.make_model(size), m, ids, chunk=args.chunk),
            "deltatune+blocks": lambda m: _compiled(C.dt_step(C.make_model(size), m, ids, chunk=args.chunk,
                                                              compile="blocks")),
            "peft": lambda m: C.peft_step(C.make_model(size), m, ids)}
    steps = {}
    for e in entries:
        lib, _, m = e.partition(":")
        steps[e] = C.floor_step(C.make_model(size), ids) if lib == "floor" else make[lib](m)
    return steps


def _compiled(step):
    """Run the first (compiling) step now and report its time, so the timed rounds exclude it."""
    t = time.perf_counter()
    step()
    print(f"  compile + first step: {time.perf_counter() - t:.1f} s", flush=True)
    return step


def ablation_group(size, args):
    ids = C.batch(args.batch, args.seq)
    steps = {"floor": C.floor_step(C.make_model(size), ids),
             "peft": C.peft_step(C.make_model(size), "lora_qv", ids),
             "dt_plain_loss": C.dt_step(C.make_model(size), "lora_qv", ids, loss="plain"),
             "dt_chunked_loss": C.dt_step(C.make_model(size), "lora_qv", ids, chunk=args.chunk)}
    if args.ablate_checkpointing:
        steps["dt_chunked+ckpt"] = C.dt_step(C.make_model(size), "lora_qv", ids, chunk=args.chunk,
                                             checkpointing=True)
    if args.ablate_compile_blocks:
        steps["dt_chunked+compile_blocks"] = _compiled(C.dt_step(C.make_model(size), "lora_qv", ids,
                                                                 chunk=args.chunk, compile="blocks"))
    if args.ablate_compile:
        t = time.perf_counter()
        s = C.dt_step(C.make_model(size), "lora_qv", ids, chunk=args.chunk, compile=True)
        s()  # compiles
        print(f"  torch.compile: first step (compile) {time.perf_counter() - t:.1f} s", flush=True)
        steps["dt_chunked+compile"] = s
    return steps


def saved_activations(size, args):
    """MiB of distinct tensors autograd keeps for the backward after one forward (load-independent)."""
    import torch

    import deltatune as dt

    def measure(model, fn):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(model)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        del loss
        return sum(v for (ptr, _), v in seen.items() if ptr not in params) / 2**20

    ids = C.batch(args.batch, args.seq)
    out = {}
    for label, opts in [("lora_qv", {}), ("lora_all_p0.05", {"targets": "all-linear", "dropout": 0.05})]:
        for loss in ("plain", "chunked"):
            m = C.make_model(size)
            dt.attach(m, "lora", r=8, alpha=16, **({"targets": C.QV} | opts))
            fn = ((lambda mm: mm(input_ids=ids, labels=ids).loss) if loss == "plain"
                  else (lambda mm: dt.chunked_causal_lm_loss(mm, ids, ids, chunk=args.chunk)))
            out[f"{label}/{loss}_loss"] = measure(m, fn)
            if label != "lora_qv":  # the same without the dropout Function (plain nn.Dropout path)
                import deltatune.methods.lora as L
                for _, layer in dt.core.iter_delta_layers(m):
                    for d in layer.deltas.values():
                        d.forward = L.LoraDelta.forward.__get__(d)
                out[f"{label}/{loss}_loss/plain_dropout"] = measure(m, fn)
    return out


def inference_group(size, batch_size, args):
    import torch

    import deltatune as dt

    ids = C.batch(batch_size, args.seq)
    models = {"base": C.make_model(size)}
    m = C.dt_attach(C.make_model(size), "lora_qv")
    _randomize_b(m)
    models["dt_unmerged"] = m
    m = C.dt_attach(C.make_model(size), "lora_qv")
    _randomize_b(m)
    models["dt_merged"] = dt.merge(m)
    pm = C.peft_model(C.make_model(size), "lora_qv")
    _randomize_b(pm)
    models["peft_unmerged"] = pm
    pm = C.peft_model(C.make_model(size), "lora_qv")
    _randomize_b(pm)
    models["peft_merged"] = pm.merge_and_unload()

    def fwd(model):
        model.eval()

        def step():
            with torch.inference_mode():
                return float(model(input_ids=ids).logits[0, 0, 0])
        return step
    return {k: fwd(v) for k, v in models.items()}


def _randomize_b(model):
    import torch

    g = torch.Generator().manual_seed(2)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


# --------------------------------------------------------------------------- memory worker

def mem_worker(args):
    """One configuration in a fresh process: prints {"baseline": MiB, "peak": MiB, "above": MiB}."""
    import deltatune  # noqa: F401  (imports count towards the baseline, like peft's)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    C.set_threads(args.threads)
    base = C.rss_mib("VmRSS")
    ids = C.batch(args.batch, args.seq)
    make = {"floor": lambda: C.floor_step(C.make_model(args.size), ids),
            "deltatune": lambda: C.dt_step(C.make_model(args.size), args.method, ids, chunk=args.chunk),
            "peft": lambda: C.peft_step(C.make_model(args.size), args.method, ids)}
    step = make[args.lib]()
    for _ in range(args.mem_steps):
        step()
    peak = C.rss_mib("VmHWM")
    print(json.dumps({"baseline": base, "peak": peak, "above": peak - base}))


def measure_memory(size, method, lib, args) -> float | None:
    cmd = [sys.executable, __file__, "--worker", "--size", size, "--method", method, "--lib", lib,
           "--threads", str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq),
           "--chunk", str(args.chunk), "--mem-steps", str(args.mem_steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        print(f"  memory worker failed ({size} {method} {lib}): {r.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["above"]


# --------------------------------------------------------------------------- report

def summarise(times):
    return {k: C.median(v) for k, v in times.items()}


def run(args):
    import torch

    import deltatune as dt

    C.set_threads(args.threads)
    out = {"machine": machine(args), "args": vars(args), "train": {}, "memory": {}, "inference": {},
           "ablation": {}, "activations": {}, "skipped": {}}
    methods = []
    for m in args.methods:
        if m != "full" and C.dt_method(m) is None:
            out["skipped"][m] = "not in dt.METHODS"
            print(f"skip {m}: deltatune has no such method yet (dt.METHODS = {sorted(dt.METHODS)})")
        else:
            methods.append(m)
            if m != "full" and C.dt_method(m)[2]:
                print(f"note {m}: deltatune config lacks {C.dt_method(m)[2]}")
    for size in args.sizes:
        size_methods = methods if size == args.sizes[0] else [m for m in methods if m in args.big_methods]
        if args.activations:
            out["activations"][size] = saved_activations(size, args)
            print(json.dumps(out["activations"][size], indent=1), flush=True)
            continue
        if args.group:
            entries = [e for e in args.group.split(",") if e == "floor" or e.split(":")[1] in methods]
            print(f"[{size}] group {entries}", flush=True)
            t = C.interleaved(custom_group(size, entries, args), args.reps, args.warmup)
            res = {"median_s": summarise(t), "vs_floor": {k: C.paired_ratio(v, t["floor"]) for k, v in t.items()}}
            for k in t:
                lib, _, m = k.partition(":")
                if lib == "deltatune" and f"peft:{m}" in t:
                    res.setdefault("dt_vs_peft", {})[m] = C.paired_ratio(t[k], t[f"peft:{m}"])
            res["rounds"] = t
            out["train"][f"{size}/group"] = res
            print(json.dumps({k: v for k, v in res.items() if k != "rounds"}, indent=1), flush=True)
        if args.ablation:
            print(f"[{size}] ablation (LoRA q,v)", flush=True)
            t = C.interleaved(ablation_group(size, args), args.reps, args.warmup)
            out["ablation"][size] = {"median_s": summarise(t),
                                     "vs_peft": {k: C.paired_ratio(v, t["peft"]) for k, v in t.items()},
                                     "vs_floor": {k: C.paired_ratio(v, t["floor"]) for k, v in t.items()}}
            print(json.dumps(out["ablation"][size], indent=1), flush=True)
            continue
        for m in ([] if args.skip_train else size_methods):
            print(f"[{size}] train {m}", flush=True)
            t0 = time.perf_counter()
            t = C.interleaved(train_group(size, m, args), args.reps, args.warmup)
            out["train"][f"{size}/{m}"] = {
                "median_s": summarise(t), "dt_vs_peft": C.paired_ratio(t["deltatune"], t["peft"]),
                "dt_vs_floor": C.paired_ratio(t["deltatune"], t["floor"]),
                "peft_vs_floor": C.paired_ratio(t["peft"], t["floor"])}
            print(f"  {out['train'][f'{size}/{m}']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            torch.manual_seed(0)
        if not args.skip_memory:
            for m in size_methods:
                libs = ["floor", "deltatune", "peft"] if m == size_methods[0] else ["deltatune", "peft"]
                for lib in libs:
                    out["memory"][f"{size}/{m}/{lib}"] = measure_memory(size, m, lib, args)
                print(f"[{size}] memory {m}: " + ", ".join(f"{k.split('/')[-1]} {v and round(v)} MiB"
                                                           for k, v in out["memory"].items()
                                                           if k.startswith(f"{size}/{m}/")), flush=True)
        if not args.skip_inference:
            for b in args.infer_batches:
                t = C.interleaved(inference_group(size, b, args), args.infer_reps, args.warmup)
                out["inference"][f"{size}/b{b}"] = {
                    "median_s": summarise(t), "vs_base": {k: C.paired_ratio(v, t["base"]) for k, v in t.items()}}
                print(f"[{size}] inference b{b}: {out['inference'][f'{size}/b{b}']}", flush=True)
    return out


def machine(args):
    import peft
    import torch
    import transformers

    import deltatune

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "deltatune": deltatune.__version__, "load_avg_start": os.getloadavg(),
            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="42m, LoRA q,v only, 3 rounds, batch-1 inference")
    ap.add_argument("--ablation", action="store_true", help="LoRA optimisations one by one instead of the suite")
    ap.add_argument("--activations", action="store_true", help="MiB saved for backward, plain vs chunked loss")
    ap.add_argument("--group", help="one interleaved group, e.g. floor,deltatune:lora_qv,peft:lora_qv,deltatune:dora,"
                         "deltatune+blocks:lora_qv (regional torch.compile)")
    ap.add_argument("--ablate-compile", action="store_true", help="with --ablation: add torch.compile")
    ap.add_argument("--ablate-compile-blocks", action="store_true",
                    help="with --ablation: add regional torch.compile (dt.fast.compile_blocks)")
    ap.add_argument("--ablate-checkpointing", action="store_true", help="with --ablation: add checkpointing")
    ap.add_argument("--sizes", default="42m,110m", help="comma list of " + ",".join(C.SIZES))
    ap.add_argument("--methods", default=",".join(C.METHODS), help="comma list of " + ",".join(C.METHODS))
    ap.add_argument("--big-methods", default="lora_qv",
                    help="methods also run on sizes after the first (keeps the full run < 15 min)")
    ap.add_argument("--reps", type=int, default=10, help="timed rounds per group (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--infer-reps", type=int, default=10)
    ap.add_argument("--infer-batches", default="1,8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=256, help="rows per chunk of the chunked loss")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "last.json"))
    # internal: one memory measurement in this process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return mem_worker(args)
    if args.quick:
        args.sizes, args.methods, args.reps, args.warmup = "42m", "lora_qv", 3, 1
        args.infer_batches, args.infer_reps = "1", 3
    args.sizes, args.methods = args.sizes.split(","), args.methods.split(",")
    args.big_methods = args.big_methods.split(",")
    args.infer_batches = [int(b) for b in args.infer_batches.split(",")]
    t0 = time.perf_counter()
    out = run(args)
    out["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
