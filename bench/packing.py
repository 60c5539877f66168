"""Packed vs padded causal-LM training: real (non-pad) tokens per second at equal loss per token.

    PYTHONPATH=src python bench/packing.py [--rounds 4] [--rows 24] [--layers 4]

Data: the chatterbot-corpus dialogues (package ``chatterbot-corpus``, the CLI demo's data) as
user/assistant chats through SmolLM2's own chat template, loss on the assistant turns
(``chat_encode.encode_causal_lm``, max_length 256).  Model: SmolLM2-135M-Instruct (the packaged
GGUF, dequantized once to fp32 by ``models.gguf_to_fp32``) with LoRA r=8 on q/v, AdamW, as
``deltatune train`` runs it.  ``--layers N`` keeps the first N of its 30 decoder layers (real
weights, real embeddings and head) so a run fits the one-minute budget of a shared 2-core CPU;
``--layers 0`` runs the whole model.  Per-token work is linear layers in both layouts, so the
ratio depends on how many slots are padding, not on the depth.

A = padded batches (``data.collate``: 16 rows in the trainer's seeded random order, padded to the
longest); B = the same rows packed (``packing.pack`` into 256-token sequences, 4 per batch).
Interleaved A, B, A, B, ... over ``--rounds`` rounds, each round training on the next ``--rows``
rows both ways (so both see the same tokens), timed per phase.  Reported: real tokens / s of each
phase per CPU second of the process (steady on a shared machine) and per wall second, the B/A
ratio per round and its median; and the loss per token of the first round's rows
computed both ways with the adapter at its initial weights (no-grad), which must agree: packing
changes the layout, not the objective.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import deltatune as dt  # noqa: E402
from deltatune.app.demo import chatterbot_pairs, smollm2_gguf  # noqa: E402
from deltatune.data import packing  # noqa: E402
from deltatune.data.chat_encode import encode_causal_lm  # noqa: E402
from deltatune.data.examples import collate  # noqa: E402
from deltatune.train.losses import causal_lm_batch_loss  # noqa: E402
from deltatune.train.trainer import epoch_batches  # noqa: E402

MAX_LENGTH = 256
PADDED_BATCH = 16  # rows per padded batch (the CLI default)
PACKED_BATCH = 4  # 256-token sequences per packed batch (~ the same real tokens as 16 chat rows of ~60)


def load(layers: int):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from deltatune.models import gguf_to_fp32

    d = gguf_to_fp32(smollm2_gguf())
    tok = AutoTokenizer.from_pretrained(str(d))
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model, tok


def rows_of(tok, n: int):
    pairs = chatterbot_pairs()
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(pairs), generator=g)[:n].tolist()
    recs = [{"messages": [{"role": "user", "content": pairs[i][0]}, {"role": "assistant", "content": pairs[i][1]}]}
            for i in pick]
    return encode_causal_lm(recs, tok, MAX_LENGTH, cache=False)


def padded_batches(feats, pad_id):
    return [collate([feats[i] for i in b], pad_id) for b in epoch_batches(len(feats), 0, 0, PADDED_BATCH)]


def packed_batches(feats, coll):
    packed = packing.pack(feats, MAX_LENGTH)
    return [coll(packed[i:i + PACKED_BATCH]) for i in range(0, len(packed), PACKED_BATCH)]


def train_phase(model, opt, batches) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of training on the batches.  CPU time is the
    steadier measure on a shared machine (other jobs stretch the wall time, not our CPU time)."""
    t, c = time.perf_counter(), time.process_time()
    for b in batches:
        causal_lm_batch_loss(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, time.process_time() - c


def loss_per_token(model, batches) -> float:
    """Sum of token losses / labelled tokens over the batches (no-grad)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            k = int((b["labels"][:, 1:] != -100).sum())
            total += causal_lm_batch_loss(model, b).item() * k
            n += k
    return total / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--layers", type=int, default=4, help="first N decoder layers of SmolLM2 (0 = all 30)")
    ap.add_argument("--threads", type=int, default=1)  # 1: steadier numbers on a shared CPU
    ap.add_argument("--out", default="bench/results/packing.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load(a.layers)
    feats = rows_of(tok, a.rows * a.rounds)
    mode = packing.attention_mode(model)
    dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    coll = packing.PackedCollator(pad, mode)
    chunks = [feats[r * a.rows:(r + 1) * a.rows] for r in range(a.rounds)]
    lens = [len(f["input_ids"]) for f in feats]
    lpt = {"padded": loss_per_token(model, padded_batches(chunks[0], pad)),
           "packed": loss_per_token(model, packed_batches(chunks[0], coll))}
    warm = rows_of(tok, a.rows * a.rounds + 8)[-8:]  # rows no round uses: first-call costs are paid here
    train_phase(model, opt, padded_batches(warm, pad)[:1] + packed_batches(warm, coll)[:1])
    rounds = []
    for r, chunk in enumerate(chunks):
        real = sum(len(f["input_ids"]) for f in chunk)
        pb, kb = padded_batches(chunk, pad), packed_batches(chunk, coll)
        slots = {"padded": sum(b["input_ids"].numel() for b in pb), "packed": sum(b["input_ids"].numel() for b in kb)}
        (wa, ca), (wb, cb) = train_phase(model, opt, pb), train_phase(model, opt, kb)  # A, then B
        rounds.append({"round": r + 1, "real_tokens": real, "slots": slots, "padded_wall_s": wa, "packed_wall_s": wb,
                       "padded_cpu_s": ca, "packed_cpu_s": cb, "padded_tok_per_cpu_s": real / ca,
                       "packed_tok_per_cpu_s": real / cb, "ratio_cpu": ca / cb, "ratio_wall": wa / wb})
        print(f"round {r + 1}: {real} real tokens; padded {real / ca:6.1f} tok/CPU-s ({len(pb)} steps, "
              f"{real / slots['padded']:.0%} real) | packed {real / cb:6.1f} tok/CPU-s ({len(kb)} steps, "
              f"{real / slots['packed']:.0%} real) | ratio {ca / cb:.2f}x CPU, {wa / wb:.2f}x wall", flush=True)
    res = {"model": f"SmolLM2-135M-Instruct, first {a.layers or 30} of 30 layers", "mode": mode, "rows_per_round": a.rows, "rounds": rounds,
           "median_ratio_cpu": statistics.median(x["ratio_cpu"] for x in rounds),
           "median_ratio_wall": statistics.median(x["ratio_wall"] for x in rounds),
           "row_tokens": {"median": statistics.median(lens), "min": min(lens), "max": max(lens)},
           "loss_per_token": lpt, "threads": a.threads, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor()}
    print(f"median ratio packed/padded: {res['median_ratio_cpu']:.2f}x per CPU second, "
          f"{res['median_ratio_wall']:.2f}x per wall second; loss per token (initial adapter, round-1 rows) "
          f"padded {lpt['padded']:.6f} packed {lpt['packed']:.6f}; attention: {mode}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
