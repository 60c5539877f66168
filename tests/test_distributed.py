"""deltatune.distributed: 2 ranks × batch b under torchrun (gloo, CPU) train the same adapter as one
process at batch 2b, with DDP and with FSDP2, and rank 0 saves the usual adapter files.

The test launches this file itself with ``python -m torch.distributed.run --nproc_per_node 2``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, B, T = 3, 2, 8  # K optimizer steps; batch b per rank; sequence length
METHODS = {"lora": dict(r=4, targets=["q_proj", "v_proj"]), "prompt": dict(num_virtual_tokens=3)}


def tiny(method):
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return dt.attach(LlamaForCausalLM(cfg), method, **METHODS[method])


def batches(world=2):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (B * world, T), generator=g) for _ in range(STEPS)]


def train(model, params, rows, loss_fn):
    opt = torch.optim.AdamW(params, lr=1e-2)
    for ids in batches():
        ids = ids[rows]
        loss_fn(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def plain_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def chunked_loss(model, ids):
    import deltatune as dt

    return dt.chunked_causal_lm_loss(model, ids, ids, chunk=5)


def worker(out: Path):  # runs under torchrun
    torch.set_num_threads(1)
    from deltatune import distributed as dtd

    rank, world = dtd.init()
    assert world == 2
    rows = slice(rank * B, (rank + 1) * B)
    for method in METHODS:
        model = dtd.ddp(tiny(method))
        train(model, dtd.trainable_parameters(model), rows, plain_loss if method == "lora" else chunked_loss)
        dtd.save(model, out / f"ddp_{method}")
    model = dtd.fsdp(tiny("lora"))
    train(model, dtd.trainable_parameters(model), rows, chunked_loss)
    dtd.save(model, out / "fsdp_lora")
    torch.distributed.destroy_process_group()


def read(d: Path):
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors")), json.loads((d / "adapter_config.json").read_text())


def test_two_ranks_equal_one_process_at_double_batch(tmp_path):
    import deltatune as dt
    from deltatune.io import adapter_payload

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    for run, method, loss in [("ddp_lora", "lora", plain_loss), ("ddp_prompt", "prompt", chunked_loss),
                              ("fsdp_lora", "lora", chunked_loss)]:
        ref = tiny(method)
        train(ref, [p for p in ref.parameters() if p.requires_grad], slice(None), loss)
        dt.save(ref, tmp_path / f"ref_{run}")
        got, got_cfg = read(tmp_path / run)
        want, want_cfg = read(tmp_path / f"ref_{run}")
        assert got.keys() == want.keys() and got_cfg == want_cfg, run
        init = adapter_payload(tiny(method))[0]  # file key -> tensor before training
        moved = False
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{run}: {k}")
            moved |= not torch.equal(want[k], init[k])
        assert moved, f"{run}: training did not change the adapter, the comparison would be empty"


def test_helpers_without_a_process_group():
    import deltatune as dt
    from deltatune import distributed as dtd

    assert dtd.init() == (0, 1) or "RANK" in os.environ
    m = tiny("lora")
    assert len(dtd.trainable_parameters(m)) == 8  # 2 layers × q,v × A,B
    with pytest.raises(dt.DeltaError, match="torchrun"):
        dtd.ddp(m)
    with pytest.raises(dt.DeltaError, match="no trainable"):
        dtd.trainable_parameters(torch.nn.Linear(2, 2).requires_grad_(False))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(Path(sys.argv[1]))
