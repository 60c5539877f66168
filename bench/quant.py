"""QLoRA's memory as the user's process sees it (issue 18): NF4 vs fp32 LoRA, loaded from disk.

    .venv/bin/python bench/quant.py                 # 110M + 1B-class + budget + perplexity -> docs/benchmarks.md
    .venv/bin/python bench/quant.py --only 110m     # one part (110m | 1b | budget | ppl)
    .venv/bin/python bench/quant.py --no-write      # print only

The user's path, one process per arm (``--worker``):
    fp32  ``LlamaForCausalLM.from_pretrained(dir, dtype=float32)`` (transformers memory-maps the
          safetensors file: its weights are file pages, not anonymous ones)
    nf4   ``dt.load_quantized(dir, "nf4")`` (deltatune.quant_load: streamed tensor by tensor)
then LoRA r=8 on q_proj, v_proj, AdamW, ``dt.chunked_causal_lm_loss`` (no (B, T, V) logits), the
same random token batch in both arms.  torch, transformers, bitsandbytes and deltatune are
imported and their kernels run once on tiny tensors before the baseline (process state, not the
model).  Memory = peak anonymous pages (RssAnon sampled every 2 ms by ``deltatune.procmem``)
+ file pages still mapped at the end (RssFile growth: the checkpoint the model still points into).
Each phase (import, load, attach, first step, steady steps, after training) records its end and
peak values, so a ratio can be traced to where the memory goes.

Models are random-init Llama shapes written once as safetensors into a temporary directory under
/tmp by this script and deleted at the end: 110M (hidden 768, 12 layers, tied 32k vocab) and a
1B-class (hidden 2048, MLP 5632, 16 layers, 32 heads, 4 KV heads, untied 32k vocab: 1.1B params,
4.4 GB fp32).  Step times are interleaved A, B, A, B (separate processes) because the 2-core
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

def write_model(d: Path, size: str, layers: int | None = None) -> Path:
    """A random-init Llama written as safetensors (built layer by layer on the meta device and
    filled in shards, so writing the 1B model never holds the fp32 model and its copy)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=1024, **{**MODELS[size],
                      **({"num_hidden_layers": layers} if layers else {})})
    d.mkdir(parents=True, exist_ok=True)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    h, m, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).contiguous()

    shards, index = [], {}
    first = {"model.embed_tokens.weight": w(32000, h), "model.norm.weight": torch.ones(h)}
    if not cfg.tie_word_embeddings:
        first["lm_head.weight"] = w(32000, h)
    shards.append(first)
    for i in range(L):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
                       p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
                       p + "mlp.gate_proj.weight": w(m, h), p + "mlp.up_proj.weight": w(m, h),
                       p + "mlp.down_proj.weight": w(h, m), p + "input_layernorm.weight": torch.ones(h),
                       p + "post_attention_layernorm.weight": torch.ones(h)})
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
    from deltatune.procmem import MemoryTrace, release_to_os, rss_kib

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
        if i:
            times.append(time.perf_counter() - t)
        else:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--trace", choices=sorted(MODELS), help="one trace per arm of this model, printed as JSON")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-release", action="store_true", help="the loader before issue 18 (no trim, no unmap)")
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.trace:
        tmp = Path(tempfile.mkdtemp(prefix=f"dt-bench-{a.trace}-", dir="/tmp"))
        try:
            write_model(tmp, a.trace)
            for arm in ("fp32", "nf4"):
                r = run_worker({"arm": arm, "dir": str(tmp), "batch": 1, "seq": SEQ[a.trace], "steps": a.steps,
                                "threads": a.threads, "checkpointing": a.checkpointing, "release": not a.no_release})
                print(json.dumps(r))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
