"""Packing (deltatune.data.packing): several rows per sequence, each row's loss equal to its unpacked loss."""
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from cli_fixtures import chat_jsonl, tiny_llama_dir
from conftest import tiny_gpt2, tiny_llama
from deltatune.data import packing
from deltatune.cli import app
from deltatune.core import DeltaError
from deltatune.train.losses import causal_lm_batch_loss

LENGTHS = [7, 3, 12, 5, 9, 2, 6, 4]  # 48 tokens: 3 sequences of <= 20


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


def rows(lengths=LENGTHS, seed=0):
    """Token rows with a masked "prompt" third, as chat rows have."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def unpacked_loss(model, f):
    return model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss.item()


def packed_row_losses(model, feats, batch, packed):
    """{row index: mean loss over its labelled tokens} from one forward of the packed batch."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits  # (B, T, V)
    target = batch["labels"][:, 1:]  # (B, T-1): token t predicts t+1
    per_tok = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=-100,
                              reduction="none")  # (B, T-1)
    out = {}
    for b, p in enumerate(packed):
        start = 0
        for i in p["rows"]:
            n = len(feats[i]["input_ids"])
            sl = slice(start, start + n - 1)  # predictions made inside the row (of its tokens 2..n)
            mask = target[b, sl] != -100
            out[i] = (per_tok[b, sl][mask].sum() / mask.sum()).item()
            start += n
    return out


def test_pack_layout():
    feats = rows()
    packed = packing.pack(feats, 20)
    assert sorted(i for p in packed for i in p["rows"]) == list(range(len(feats)))  # every row once
    assert len(packed) == 3 and all(len(p["input_ids"]) <= 20 for p in packed)
    for p in packed:
        start = 0
        for i in p["rows"]:
            n = len(feats[i]["input_ids"])
            assert p["input_ids"][start:start + n] == feats[i]["input_ids"]
            assert p["position_ids"][start:start + n] == list(range(n))  # positions restart per row
            assert p["labels"][start] == -100 and p["labels"][start + 1:start + n] == feats[i]["labels"][1:]
            start += n
    with pytest.raises(DeltaError, match="row 3 has 12 tokens, more than max_length 10"):
        packing.pack(feats, 10)


def test_should_pack_rule():
    assert packing.should_pack([30, 40, 200], 256) and not packing.should_pack([120, 140, 200], 256)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("mode", packing.MODES)
def test_each_row_loss_equals_unpacked(family, mode):
    model = MODELS[family]()
    feats = rows()
    packed = packing.pack(feats, 20)
    batch = packing.PackedCollator(pad_id=0, mode=mode)(packed)
    with torch.no_grad():
        got = packed_row_losses(model, feats, batch, packed)
        want = {i: unpacked_loss(model, f) for i, f in enumerate(feats)}
        for i in want:
            assert abs(got[i] - want[i]) <= 1e-5, (family, mode, i, got[i], want[i])
        # the trainer's loss over the packed batch = the token-weighted mean of the rows' losses
        n = {i: sum(t != -100 for t in f["labels"][1:]) for i, f in enumerate(feats)}
        mean = sum(want[i] * n[i] for i in want) / sum(n.values())
        assert abs(causal_lm_batch_loss(model, batch).item() - mean) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_restarting_positions_rows_mix(family):
    """The control: the same packed ids with positions 0..T-1 and no mask give other losses, so the
    equality above is the packing's doing."""
    model = MODELS[family]()
    feats = rows()
    packed = packing.pack(feats, 20)
    batch = packing.PackedCollator(pad_id=0, mode="position_ids")(packed)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        got = packed_row_losses(model, feats, batch, packed)
        later = [i for p in packed for i in p["rows"][1:]]  # rows that follow another row
        assert max(abs(got[i] - unpacked_loss(model, feats[i])) for i in later) > 1e-3


class _Mixer(nn.Module):
    """A 'language model' whose tokens see the mean of all earlier tokens, ignoring masks and
    positions: packing cannot keep its rows apart."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=16)
        self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, input_ids, **kw):
        h = self.emb(input_ids).cumsum(1)  # (B, T, 8)
        return types.SimpleNamespace(logits=self.head(h))


def test_attention_mode_verifies_and_refuses_a_mixing_model():
    assert packing.attention_mode(tiny_llama()) in packing.MODES
    with pytest.raises(DeltaError, match="_Mixer mixes packed rows.*--no-packing"):
        packing.attention_mode(_Mixer())


def test_prompt_and_prefix_refused():
    for method in ("prompt", "prefix"):
        with pytest.raises(DeltaError, match=f"--packing cannot be used with --method {method}.*--no-packing"):
            packing.check_method(method, True)
    packing.check_method("prompt", None)  # unset: packing is simply off for them


# --------------------------------------------------------------------------- through the CLI

def _train(tmp_path, *extra):
    lm = tiny_llama_dir(tmp_path / "llama")
    data = chat_jsonl(tmp_path / "chat.jsonl", 24)
    args = ["train", "--model", lm, "--data", data, "--task", "causal-lm", "--output", tmp_path / "o",
            "--max-steps", 3, "--batch-size", 4, "--no-progress", *extra]
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_packs_short_rows_by_default(tmp_path):
    r = _train(tmp_path)
    assert r.exit_code == 0, r.output
    assert "packing: 22 rows in 1 sequence(s) of <= 256 tokens" in r.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["after"]["loss"] < m["before"]["loss"] and m["tokens_per_s"] > 0


def test_cli_no_packing_and_prompt_refusal(tmp_path):
    r = _train(tmp_path, "--no-packing")
    assert r.exit_code == 0 and "packing:" not in r.output
    r = _train(tmp_path, "--method", "prompt", "--packing", "--output", tmp_path / "p")
    assert r.exit_code == 2
    assert "--packing cannot be used with --method prompt" in r.output and "Traceback" not in r.output
    r = _train(tmp_path, "--method", "prompt", "--output", tmp_path / "q")  # unset: prompt tuning trains unpacked
    assert r.exit_code == 0 and "packing:" not in r.output
