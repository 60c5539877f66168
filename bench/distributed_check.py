"""Check that deltatune trains under ``accelerate launch`` (and plain ``torchrun``) on CPU.

    accelerate launch --cpu --num_processes 2 bench/distributed_check.py OUT_DIR
    torchrun --nproc_per_node 2 bench/distributed_check.py OUT_DIR

1. a plain loop with ``accelerate.Accelerator().prepare(model, optimizer)``;
2. ``deltatune.trainer.Trainer`` on a ``dtd.ddp`` model, each rank with its shard of the data.
After each, the adapters must be identical on every rank (they were synchronised by the gradient
all-reduce) and rank 0 saves them; prints "ok" on success.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import deltatune as dt
from deltatune.train import distributed as dtd


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return dt.attach(LlamaForCausalLM(cfg), "lora", r=4, targets=["q_proj", "v_proj"])


def same_on_all_ranks(model) -> bool:
    flat = torch.cat([p.detach().flatten() for p in dtd.trainable_parameters(model)])
    other = flat.clone()
    dist.broadcast(other, src=0)
    return torch.allclose(flat, other)


def data(rank, world, n=8):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (n * world, 8), generator=g)[rank::world]
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def with_accelerate(out: Path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = tiny()
    dtd.broadcast_adapters(model)  # LoRA's A is random: start every rank from rank 0's
    opt = torch.optim.AdamW(dtd.trainable_parameters(model), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    for feats in [data(acc.process_index, acc.num_processes)[i:i + 2] for i in range(0, 8, 2)]:
        ids = torch.tensor([f["input_ids"] for f in feats])
        acc.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    assert same_on_all_ranks(acc.unwrap_model(model)), "accelerate: adapters differ across ranks"
    dtd.save(acc.unwrap_model(model), out / "accelerate")


def with_trainer(out: Path):
    from deltatune.train.trainer import Trainer, TrainConfig

    rank, world = dtd.init()
    model = dtd.ddp(tiny())
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, progress=False)
    Trainer(model, data(0, 1, n=8 * world), cfg).train()  # every rank gets all rows; the trainer shards
    assert same_on_all_ranks(model), "trainer: adapters differ across ranks"
    dtd.save(model, out / "trainer")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    with_accelerate(out)
    with_trainer(out)
    if dtd.rank() == 0:
        print("ok", sorted(p.name for p in out.iterdir()))
    dist.destroy_process_group()
