"""deltatune.distributed: 2 ranks × batch b under torchrun (gloo, CPU) train the same adapter as one
process at batch 2b, with DDP and with FSDP2, and rank 0 saves the usual adapter files; the same
holds for ``deltatune.trainer.Trainer`` launched on 2 ranks (it shards the data itself), including
a run interrupted and resumed from its checkpoint.

The tests launch this file itself with ``python -m torch.distributed.run --nproc_per_node 2``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, B, T = 3, 2, 8  # K optimizer steps; batch b per rank; sequence length
METHODS = {"lora": dict(r=4, targets=["q_proj", "v_proj"]), "prompt": dict(num_virtual_tokens=3),
           "adalora": dict(r=4, targets=["q_proj", "v_proj"], target_r=2, tinit=1, tfinal=1, deltaT=1)}


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


def worker(out: Path):  # runs under torchrun: the hand-written loop
    torch.set_num_threads(1)
    from deltatune.train import distributed as dtd

    rank, world = dtd.init()
    assert world == 2
    rows = slice(rank * B, (rank + 1) * B)
    for method in ("lora", "prompt"):
        model = dtd.ddp(tiny(method))
        train(model, dtd.trainable_parameters(model), rows, plain_loss if method == "lora" else chunked_loss)
        dtd.save(model, out / f"ddp_{method}")
    model = dtd.fsdp(tiny("lora"))
    train(model, dtd.trainable_parameters(model), rows, chunked_loss)
    dtd.save(model, out / "fsdp_lora")


# --------------------------------------------------------------------------- the Trainer on 2 ranks
# 12 rows of equal length (so a mean over 2 × b rows is the mean of the two ranks' means), batch
# b = 2 per rank, 2 micro-batches a step: 3 global batches of 4 rows an epoch, K = 3 steps cross
# into the second epoch's reshuffle.  Warmup, decay, clipping and weight decay all act.

def trainer_features(n=12, t=T):
    g = torch.Generator().manual_seed(11)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in torch.randint(0, 64, (n, t), generator=g)]


def trainer_eval(model):
    """Loss on this rank's half of 6 validation rows: averaged over 2 ranks = loss on all 6."""
    from deltatune.train import distributed as dtd
    from deltatune.data.examples import collate

    rows = trainer_features(6)[dtd.rank()::dtd.world_size()]
    return {"loss": float(model(**collate(rows)).loss)}


def trainer_config(batch, **kw):
    from deltatune.train.trainer import TrainConfig

    return TrainConfig(lr=1e-2, weight_decay=0.01, batch_size=batch, grad_accum=2, max_steps=STEPS, warmup_ratio=0.34,
                       max_grad_norm=0.05, seed=5, eval_every=1, save_every=2, progress=False, **kw)


class Stop(Exception):
    pass


def run_trainer(out: Path, batch: int, stop_at: int = 0, method: str = "lora", **kw):
    """Train a tiny model with the Trainer (resuming from ``out`` if it holds checkpoints); a
    callback raises ``Stop`` after step ``stop_at`` (before that step's checkpoint)."""
    from deltatune.train.trainer import Trainer

    def stop(step, total, model):
        if step == stop_at:
            raise Stop

    tr = Trainer(tiny(method), trainer_features(), trainer_config(batch, **kw), eval_fn=trainer_eval,
                 output_dir=out, callbacks=[stop])
    try:
        res = tr.train(resume=True)
    except Stop:
        return None
    tr.save_adapter(out / "adapter")
    if tr.is_main:
        (out / "result.json").write_text(json.dumps({"history": res.history, "evals": res.evals, "world": tr.world}))
    return tr


# run name, method, parallel: the last three are interrupted after step 3 and resumed from step 2
TRAINER_RUNS = [("t_ddp", "lora", "ddp"), ("t_ddp_resumed", "lora", "ddp"), ("t_fsdp_resumed", "lora", "fsdp"),
                ("t_ddp_adalora_resumed", "adalora", "ddp")]


def trainer_worker(out: Path):  # runs under torchrun
    torch.set_num_threads(1)
    import deltatune as dt
    from deltatune import files as io, files as safety
    from deltatune.train import distributed as dtd, trainer

    rank, world = dtd.init()
    assert world == 2
    if rank != 0:  # only rank 0 may write: any write on rank 1 fails the run
        def refuse(*a, **kw):
            raise AssertionError(f"rank {rank} wrote {a[:1]}")

        trainer.atomic_write = io.atomic_write = safety.atomic_dir = refuse
    with pytest.raises(dt.DeltaError, match="whole data set"):  # pre-sharded data (the old recipe) is refused
        trainer.Trainer(tiny("lora"), trainer_features()[rank::2], trainer_config(B))
    run_trainer(out / "t_ddp", B)
    for run, method, parallel in TRAINER_RUNS[1:]:
        d = out / run
        assert run_trainer(d, B, stop_at=STEPS, method=method, parallel=parallel) is None
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest", "step-0000002"]
        tr = run_trainer(d, B, method=method, parallel=parallel)
        assert (tr.rank, tr.world, tr.is_main) == (rank, 2, rank == 0)
    fresh_head_under_fsdp(dt, trainer)
    dtd.barrier()  # no rank tears the group down while the other still writes
    torch.distributed.destroy_process_group()


def fresh_head_under_fsdp(dt, trainer):
    """FSDP2 replaces the model's Parameters when it shards them: the fresh head's own AdamW group
    (head_lr) and LP-FT's body list must name the new ones, not those seen before the wrap."""
    from conftest import tiny_bert_cls

    model = dt.attach(tiny_bert_cls(), "lora")
    rows = [{"input_ids": [5 + i, 6, 7], "labels": i % 2} for i in range(8)]
    tr = trainer.Trainer(model, rows, trainer.TrainConfig(parallel="fsdp", batch_size=2, max_steps=2, head_warmup=0.5,
                                                          progress=False, compile="off"))
    tr._prepare_model()
    opt, _ = tr._optimizer()
    live = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(opt.param_groups) == 2, "the head trains at the body's rate under FSDP"
    assert {id(p) for g in opt.param_groups for p in g["params"]} == live
    assert tr.head and {id(p) for p in tr.head} <= live and {id(p) for p in tr.head_warmup.body} <= live
    assert tr.head_warmup.steps == 1


def read(d: Path):
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors")), json.loads((d / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """One torchrun launch (2 ranks) runs both workers: imports are most of its time."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    (out / "torchrun.log").write_text(r.stderr)
    assert r.returncode == 0, f"{out / 'torchrun.log'}:\n" + r.stderr[-3000:]
    return out


def test_two_ranks_equal_one_process_at_double_batch(launched, tmp_path):
    import deltatune as dt
    from deltatune.storage.adapter import adapter_payload

    for run, method, loss in [("ddp_lora", "lora", plain_loss), ("ddp_prompt", "prompt", chunked_loss),
                              ("fsdp_lora", "lora", chunked_loss)]:
        ref = tiny(method)
        train(ref, [p for p in ref.parameters() if p.requires_grad], slice(None), loss)
        dt.save(ref, tmp_path / f"ref_{run}")
        got, got_cfg = read(launched / run)
        want, want_cfg = read(tmp_path / f"ref_{run}")
        assert got.keys() == want.keys() and got_cfg == want_cfg, run
        init = adapter_payload(tiny(method))[0]  # file key -> tensor before training
        moved = False
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{run}: {k}")
            moved |= not torch.equal(want[k], init[k])
        assert moved, f"{run}: training did not change the adapter, the comparison would be empty"


def test_trainer_on_two_ranks_equals_one_process_at_double_batch(launched, tmp_path):
    """``Trainer`` under torchrun (DDP; DDP, FSDP2 and DDP + AdaLoRA interrupted after step 3 and
    resumed from the step-2 checkpoint) ends with the adapter, per-step losses and eval metrics of
    one process at batch 2b; rank 1 wrote nothing (its writes are made to fail)."""
    refs = {}
    for method in ("lora", "adalora"):
        run_trainer(tmp_path / method, 2 * B, method=method)
        refs[method] = (*read(tmp_path / method / "adapter"), json.loads((tmp_path / method / "result.json").read_text()))
    ranks = read(launched / "t_ddp_adalora_resumed" / "adapter")[0]
    assert any(not v.all() for k, v in ranks.items() if k.endswith("lora_E")), "AdaLoRA pruned nothing"
    for run, method, _ in TRAINER_RUNS:
        want, want_cfg, ref_res = refs[method]
        got, got_cfg = read(launched / run / "adapter")
        assert got.keys() == want.keys() and got_cfg == want_cfg, run
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=f"{run}: {k}")
        res = json.loads((launched / run / "result.json").read_text())  # resumed: steps 1-2 from the checkpoint
        for a, b in zip(res["history"] + res["evals"], ref_res["history"] + ref_res["evals"], strict=True):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * max(1, abs(b[k])) for k in a), (run, a, b)
    assert not list(launched.glob("**/*.tmp")) and not list(launched.glob("**/.*dt-new*"))
    from deltatune.storage.adapter import adapter_payload

    want = refs["lora"][0]
    assert any(not torch.equal(want[k], v) for k, v in adapter_payload(tiny("lora"))[0].items()), "nothing trained"


def test_trainer_under_accelerate_launch(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU; accelerate runs torchrun)
    drives the same Trainer code: same adapter as one process at batch 2b.  (``--cpu
    --num_processes 2`` would start a single process: accelerate's CPU mode expects MPI.)"""
    import socket

    pytest.importorskip("accelerate")
    with socket.socket() as sock:  # accelerate's default port 29500 may be taken by another job
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), __file__, "accelerate", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    run_trainer(tmp_path / "ref", 2 * B)
    want, _ = read(tmp_path / "ref" / "adapter")
    got, _ = read(tmp_path / "acc" / "adapter")
    assert json.loads((tmp_path / "acc" / "result.json").read_text())["world"] == 2
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_process_group_is_left_before_exit(tmp_path):
    """dtd.init() destroys the group it joined when the process exits: a group still alive at
    interpreter teardown can abort a rank whose run succeeded (exit -6), failing the whole job."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = ("import atexit, torch.distributed as dist\n"
              # registered first, so it runs last (atexit is LIFO): after deltatune's own handler
              "atexit.register(lambda: print('alive at exit:', dist.is_initialized(), flush=True))\n"
              "import deltatune.train.distributed as dtd\n"
              "print('joined:', dtd.init(), flush=True)\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "joined: (0, 1)" in r.stdout and "alive at exit: False" in r.stdout, r.stdout


def test_epoch_batches_rule():
    """Rank r's batch j is the r-th contiguous part of global batch j; concatenated over ranks the
    global batches are those of one process at W × b (W divides n), and a short epoch is padded
    by repeating its first rows so every rank gets the same number of rows."""
    from deltatune.train.trainer import epoch_batches

    for n, b, w in [(12, 2, 2), (13, 2, 2), (10, 3, 4), (3, 1, 4)]:
        one = epoch_batches(n, 5, 1, b * w)
        per_rank = [epoch_batches(n, 5, 1, b, r, w) for r in range(w)]
        assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == -(-(n + -n % w) // (b * w))
        glob = [sum((per_rank[r][j] for r in range(w)), []) for j in range(len(per_rank[0]))]
        assert all(len({len(x[j]) for x in per_rank}) == 1 for j in range(len(glob)))  # equal shares
        flat = sum(glob, [])
        assert sorted(set(flat)) == list(range(n)) and len(flat) == n + -n % w
        if n % w == 0:
            assert glob == one
        assert flat[n:] == sum(one, [])[:len(flat) - n]  # the padding repeats the epoch's first rows


def test_helpers_without_a_process_group():
    import deltatune as dt
    from deltatune.train import distributed as dtd

    assert dtd.init() == (0, 1) or "RANK" in os.environ
    m = tiny("lora")
    assert len(dtd.trainable_parameters(m)) == 8  # 2 layers × q,v × A,B
    with pytest.raises(dt.DeltaError, match="torchrun"):
        dtd.ddp(m)
    with pytest.raises(dt.DeltaError, match="no trainable"):
        dtd.trainable_parameters(torch.nn.Linear(2, 2).requires_grad_(False))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1] == "accelerate":
        run_trainer(Path(sys.argv[2]) / "acc", B)
    else:
        worker(Path(sys.argv[1]))
        trainer_worker(Path(sys.argv[1]))
