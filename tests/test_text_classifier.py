"""Sentence-transformers checkpoints classified through the pooling they declare
(deltatune/text/classifier.py).  The oracle for the pooled vector is sentence-transformers'
own ``SentenceTransformer.encode`` on the same directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.core.delta import DeltaError
from deltatune.text import classifier as tc
from deltatune.text.classifier import SENTENCE_HEAD_WARMUP

from cli_fixtures import run_cli, spam_rows, tiny_bert_dir, write_csv

MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
         "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "lasttoken": "pooling_mode_lasttoken"}


def st_dir(path: Path, mode: str = "mean", normalize: bool = True) -> Path:
    """A tiny BERT saved as sentence-transformers saves one: modules.json, 1_Pooling, 2_Normalize."""
    tiny_bert_dir(path)
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir()
    (path / "modules.json").write_text(json.dumps(mods))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{k: k == MODES[mode] for k in MODES.values()}}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return path


def pooled_vectors(model, tok, texts):
    """The vector the head reads: the classifier's input, captured by a forward pre-hook."""
    seen = []
    h = model.classifier.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.eval()
    with torch.no_grad():
        model(**tok(texts, padding=True, return_tensors="pt"))
    h.remove()
    return seen[0]


TEXTS = ["win a free prize now", "see you at lunch", "can you call me later"]


# --------------------------------------------------------------------------- reading the declaration

@pytest.mark.parametrize("mode", list(MODES))
def test_declared_pooling_is_read(tmp_path, mode):
    assert tc.sentence_pooling(st_dir(tmp_path, mode, normalize=False)) == {"pooling": mode, "normalize": False}


def test_plain_transformers_directory_is_not_pooled(tmp_path):
    assert tc.sentence_pooling(tiny_bert_dir(tmp_path)) is None


def test_unknown_pooling_and_escaping_paths_keep_transformers_class(tmp_path):
    d = st_dir(tmp_path)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    assert tc.sentence_pooling(d) is None
    mods = json.loads((d / "modules.json").read_text())
    mods[1]["path"] = "../../etc"
    (d / "modules.json").write_text(json.dumps(mods))
    assert tc.sentence_pooling(d) is None


def test_oversized_or_broken_declaration_is_one_line(tmp_path):
    d = st_dir(tmp_path)
    (d / "modules.json").write_text("[" + " " * (tc.MAX_JSON + 1) + "]")
    with pytest.raises(DeltaError, match="too large"):
        tc.sentence_pooling(d)
    (d / "modules.json").write_text("[{")
    with pytest.raises(DeltaError, match="not valid JSON"):
        tc.sentence_pooling(d)


# --------------------------------------------------------------------------- pooling arithmetic

def test_pool_ignores_padding():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 3, generator=g)  # (B, T, H)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.allclose(tc.pool(s, mask, "mean")[1], s[1, :2].mean(0))
    assert torch.allclose(tc.pool(s, mask, "mean_sqrt_len")[1], s[1, :2].sum(0) / 2 ** 0.5)
    assert torch.allclose(tc.pool(s, mask, "max")[1], s[1, :2].amax(0))
    assert torch.equal(tc.pool(s, mask, "cls"), s[:, 0])
    assert torch.equal(tc.pool(s, mask, "lasttoken"), torch.stack([s[0, 3], s[1, 1]]))
    # prompt tuning: 2 virtual tokens lead (B, 2+T, H); they are attended, the mask is (B, T)
    s2 = torch.randn(2, 6, 3, generator=g)
    assert torch.allclose(tc.pool(s2, mask, "mean")[1], s2[1, :4].mean(0))
    # prefix tuning: the mask (B, P+T) also covers 3 cached prefix positions the states (B, T, H) do not have
    long = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], dim=1)
    assert torch.allclose(tc.pool(s, long, "mean")[1], s[1, :2].mean(0))


# --------------------------------------------------------------------------- against sentence-transformers

@pytest.mark.parametrize("mode,normalize", [("mean", True), ("cls", False), ("max", False), ("mean_sqrt_len", False)])
def test_pooled_vector_equals_sentence_transformers_encode(tmp_path, mode, normalize):
    st = pytest.importorskip("sentence_transformers")
    from deltatune.models import load_model

    d = st_dir(tmp_path, mode, normalize)
    model, tok, _ = load_model(str(d), "classify", ["ham", "spam"])
    assert isinstance(model, tc.PooledModelForSequenceClassification)
    ours = pooled_vectors(model, tok, TEXTS)
    ref = st.SentenceTransformer(str(d), device="cpu", local_files_only=True).encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_packaged_minilm_pools_as_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from deltatune.models import load_model
    from real_data import minilm_dir

    d = minilm_dir()
    model, tok, _ = load_model(str(d), "classify", ["neg", "pos"])
    assert model.config.sentence_pooling == {"pooling": "mean", "normalize": True}
    ref = st.SentenceTransformer(str(d), device="cpu", local_files_only=True).encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(pooled_vectors(model, tok, TEXTS), ref.cpu(), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- the library on it

def test_paths_read_as_transformers_and_head_is_fresh(tmp_path):
    from deltatune.core.targets import auto_modules_to_save
    from deltatune.models import load_model

    model, _, _ = load_model(str(st_dir(tmp_path)), "classify", ["ham", "spam"])
    names = [n for n, _ in model.named_parameters()]
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert not [n for n in names if "pooler" in n]  # never read: not carried
    assert auto_modules_to_save(model) == ["classifier"]
    assert model.config.id2label == {0: "ham", 1: "spam"}


def test_labels_give_the_losses_transformers_gives(tmp_path):
    from deltatune.models import load_model

    model, tok, _ = load_model(str(st_dir(tmp_path)), "classify", ["ham", "spam"])
    model.eval()
    b = tok(TEXTS[:2], padding=True, return_tensors="pt")
    out = model(**b, labels=torch.tensor([1, 0]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 0])))
    assert model.config.problem_type == "single_label_classification"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_then_eval_reproduces_the_run(tmp_path, method):
    """train on a sentence-transformers directory, then ``eval`` of the saved run (an adapter over
    the recorded base, or a full run's own model directory) reproduces the run's held-out numbers."""
    d = st_dir(tmp_path / "st")
    rows = spam_rows(48)
    write_csv(tmp_path / "train.csv", rows[:36])
    write_csv(tmp_path / "val.csv", rows[36:])
    run_cli("train", "--model", d, "--data", tmp_path / "train.csv", "--val-data", tmp_path / "val.csv",
            "--method", method, "--max-steps", "6", "--output", tmp_path / "run")
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert trained["train_config"]["head_warmup"] == SENTENCE_HEAD_WARMUP  # LP-FT on the declared embedding
    assert trained["pooling"] == {"pooling": "mean", "normalize": True}
    card = (Path(trained["artifact"]) / "README.md").read_text()
    assert "mean-pooled, L2-normalised" in card and "pooler([CLS])" in card
    again = json.loads(run_cli("eval", "--adapter", tmp_path / "run", "--data", tmp_path / "val.csv", "--json").stdout)
    assert again["metrics"]["accuracy"] == pytest.approx(trained["after"]["accuracy"])
    assert again["metrics"]["loss"] == pytest.approx(trained["after"]["loss"], rel=1e-4)
    assert trained["forgetting"]["kind"] == "representation_drift"


def test_full_run_saves_a_sentence_transformers_directory(tmp_path):
    """A full run's model directory reloads exactly in deltatune and, body + pooling, in
    sentence-transformers (the oracle again)."""
    st = pytest.importorskip("sentence_transformers")
    from deltatune.models import load_model

    model, tok, _ = load_model(str(st_dir(tmp_path / "st")), "classify", ["ham", "spam"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "tuned": differs from the base everywhere
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    back, tok2, _ = load_model(str(tmp_path / "saved"), "classify", ["ham", "spam"])
    b = tok(TEXTS, padding=True, return_tensors="pt")
    model.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits, model(**b).logits, atol=0, rtol=0)
    ref = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu", local_files_only=True)
    torch.testing.assert_close(pooled_vectors(model, tok, TEXTS), ref.encode(TEXTS, convert_to_tensor=True).cpu(),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(DeltaError, match="trained on 2 labels"):
        load_model(str(tmp_path / "saved"), "classify", ["a", "b", "c"])


def test_lp_ft_default_only_for_the_declared_embedding(tmp_path):
    """--head-warmup's CLI default: 0.25 on a sentence-transformers checkpoint, 0 on transformers'
    own classifier (pooler([CLS])), and the flag wins over both."""
    rows = spam_rows(24)
    write_csv(tmp_path / "train.csv", rows)
    cases = [(st_dir(tmp_path / "st"), [], SENTENCE_HEAD_WARMUP), (st_dir(tmp_path / "st0"), ["--head-warmup", "0"], 0.0),
             (tiny_bert_dir(tmp_path / "plain"), [], 0.0)]
    for i, (d, flags, want) in enumerate(cases):
        run_cli("train", "--model", d, "--data", tmp_path / "train.csv", "--max-steps", "2", "--output",
                tmp_path / f"r{i}", "--no-progress", *flags)
        got = json.loads((tmp_path / f"r{i}" / "metrics.json").read_text())["train_config"]["head_warmup"]
        assert got == want, (d.name, flags)


def test_merged_lora_equals_the_adapter_and_reloads(tmp_path):
    """merge of a LoRA trained on a sentence-transformers base: the merged directory reloads
    (text_classifier.json) with the adapter's logits, and sentence-transformers reads its body."""
    st = pytest.importorskip("sentence_transformers")
    import deltatune as dt
    from deltatune.models import load_model

    d = st_dir(tmp_path / "st")
    write_csv(tmp_path / "train.csv", spam_rows(32))
    run_cli("train", "--model", d, "--data", tmp_path / "train.csv", "--max-steps", "4", "--lr", "0.05",
            "--output", tmp_path / "run", "--no-progress")
    run_cli("merge", "--adapter", tmp_path / "run", "--output", tmp_path / "merged")
    base, tok, _ = load_model(str(d), "classify", ["ham", "spam"])
    dt.load(base, tmp_path / "run" / "adapter")
    merged, _, _ = load_model(str(tmp_path / "merged"), "classify", ["ham", "spam"])
    assert isinstance(merged, tc.PooledModelForSequenceClassification)
    b = tok(TEXTS, padding=True, return_tensors="pt")
    base.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**b).logits, base(**b).logits, atol=1e-5, rtol=1e-4)
        with dt.disabled(base):  # the body did change: the check above is not base == base
            assert not torch.allclose(pooled_vectors(base, tok, TEXTS), pooled_vectors(merged, tok, TEXTS), atol=1e-4)
    ref = st.SentenceTransformer(str(tmp_path / "merged"), device="cpu", local_files_only=True)
    torch.testing.assert_close(pooled_vectors(merged, tok, TEXTS), ref.encode(TEXTS, convert_to_tensor=True).cpu(),
                               atol=1e-5, rtol=1e-4)


def test_served_classify_equals_the_library_in_mixed_padded_batches(tmp_path):
    """deltatune serve on a sentence-transformers base: rows of different lengths and adapters
    batched together (padding, per-row adapters) score as the library scores each row alone."""
    pytest.importorskip("httpx"), pytest.importorskip("fastapi"), pytest.importorskip("uvicorn")
    import concurrent.futures

    import httpx

    import deltatune as dt
    from deltatune.models import load_model
    from deltatune.serve.app import ServerThread, build_app

    def load():  # the base's fresh head is random: the same seed gives the server and the reference the same one
        torch.manual_seed(0)
        return load_model(str(d), "classify", ["ham", "spam"])[:2]

    d = st_dir(tmp_path / "st")
    m, tok = load()
    for i, n in enumerate(("a", "b")):
        torch.manual_seed(i)
        dt.attach(m, "lora", name=n, r=4)
        with torch.no_grad():
            for t in dt.adapter_tensors(m, n).values():
                t.add_(0.05 * torch.randn_like(t))
        dt.save(m, tmp_path / "adapters" / n, name=n)
    ref = load()[0]
    for n in ("a", "b"):
        dt.load(ref, tmp_path / "adapters" / n, name=n)
    app = build_app(load()[0], tok, tmp_path / "adapters", window_ms=80)  # never put in eval mode by the test
    jobs = [("a", TEXTS[0]), ("b", TEXTS[1]), (None, TEXTS[2]), ("a", "lunch")]

    def send(job):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            return c.post("/v1/classify", json={"adapter": job[0], "text": job[1]})

    with ServerThread(app) as srv, concurrent.futures.ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(send, jobs))
    for (a, text), r in zip(jobs, rs):
        assert r.status_code == 200, r.text
        b = tok([text], return_tensors="pt")
        with torch.no_grad():
            if a is None:
                with dt.disabled(ref):
                    logits = ref(**b).logits
            else:
                dt.activate(ref, a)
                logits = ref(**b).logits
        torch.testing.assert_close(torch.tensor(r.json()["scores"]), logits.softmax(-1)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["adalora", "adapter", "bitfit", "ia3", "ln", "lora", "prefix", "prompt", "sparse",
                                    "vera"])
def test_every_method_on_the_pooled_classifier(tmp_path, method):
    """Each method on a sentence-transformers classifier: attaches, only its tensors (and the head)
    get gradients, output unchanged at init where the method promises it, disabling gives the base
    back, and save/load reproduces the outputs."""
    import deltatune as dt
    from deltatune.models import load_model

    assert method in dt.METHODS
    d = st_dir(tmp_path / "st")

    def load():
        torch.manual_seed(0)
        return load_model(str(d), "classify", ["ham", "spam"])[:2]

    m, tok = load()
    b = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        y_base = m(**b).logits
    dt.attach(m, method, **({"batches": [{**b, "labels": torch.tensor([1, 0, 0])}]} if method == "sparse" else {}))
    m.eval()
    with torch.no_grad():
        y_init = m(**b).logits
    if method not in ("prefix", "prompt"):  # virtual tokens change the output by design
        torch.testing.assert_close(y_init, y_base, atol=1e-5, rtol=0)
    m.train()
    m(**b, labels=torch.tensor([1, 0, 0])).loss.backward()
    saved = {id(t) for t in dt.adapter_tensors(m, "default").values()}  # what the adapter file holds (head included)
    moved = [n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert moved and all(id(p) in saved for n, p in m.named_parameters() if n in moved), moved[:4]
    with torch.no_grad():
        for t in dt.adapter_tensors(m, "default").values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))  # non-trivial values for the checks below
    m.eval()
    with torch.no_grad():
        y = m(**b).logits
        with dt.disabled(m):
            torch.testing.assert_close(m(**b).logits, y_base, atol=1e-5, rtol=0)
    dt.save(m, tmp_path / "a")
    back, _ = load()
    dt.load(back, tmp_path / "a")
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("normalize", [True, False])
def test_head_on_a_unit_norm_embedding_trains_at_sqrt_h_times_the_floor(tmp_path, normalize):
    """train/head_warmup.py: a head reading the unit-norm embedding (RMS 1/sqrt(H) per coordinate)
    gets head_lr * sqrt(H); without Normalize the features keep their scale and the floor stays.
    Checked where it acts (the optimizer's groups) and where the CLI records it (metrics.json)."""
    import math

    import deltatune as dt
    from deltatune.models import load_model
    from deltatune.train.head_warmup import HEAD_LR, head_parameters
    from deltatune.train.trainer import TrainConfig, Trainer

    d = st_dir(tmp_path / "st", normalize=normalize)
    want = HEAD_LR * (math.sqrt(32) if normalize else 1.0)  # tiny BERT: H = 32
    model = dt.attach(load_model(str(d), "classify", ["ham", "spam"])[0], "lora")
    feats = [{"input_ids": [2, 5 + i % 7, 3], "attention_mask": [1, 1, 1], "labels": i % 2} for i in range(8)]
    trainer = Trainer(model, feats, TrainConfig(max_steps=1, progress=False, compile="off"))
    opt, _ = trainer._optimizer()
    head = {id(p) for p in head_parameters(model)}
    rates = {("head" if id(opt.param_groups[i]["params"][0]) in head else "body"): g["lr"]
             for i, g in enumerate(opt.param_groups)}
    assert rates == {"body": 1e-3, "head": pytest.approx(want)}
    write_csv(tmp_path / "train.csv", spam_rows(24))
    run_cli("train", "--model", d, "--data", tmp_path / "train.csv", "--max-steps", "2", "--output", tmp_path / "r",
            "--no-progress")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["head_lr"] == pytest.approx(want)
