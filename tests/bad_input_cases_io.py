"""The bad-input catalogue, part 2: data files, CLI arguments and HTTP bodies (registered into
``bad_input_cases.CASES``; see that module for what every case must satisfy)."""
from __future__ import annotations

import warnings

import pytest

import deltatune as dt
from bad_input_cases import CASES, W, Case, case
from conftest import tiny_llama, word_tokenizer


# --------------------------------------------------------------------------- data files

def _data(name: str, content: bytes | str, task="classify", **cols):
    def build(ws):
        from deltatune.data.examples import load_examples

        p = ws / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return None, lambda: load_examples(task, p, **cols)
    return build


for _id, _args, _exp in [
    ("empty_file", ("d.csv", ""), ("d.csv: the file is empty",)),
    ("header_only", ("d.csv", "text,label\n"), ("no data rows",)),
    ("missing_columns", ("d.csv", "body,y_true\nhi,1\nyo,0\n"), ("cannot tell which column holds the text", "body")),
    ("named_column_absent", ("d.csv", "text,label\nhi,1\nyo,0\n", "classify", {"text_column": "txt"}),
     ("no column 'txt' (did you mean 'text'?)",)),
    ("non_utf8", ("d.csv", b"text,label\ncaf\xe9,1\nok,0\n"), ("line 2 is not valid UTF-8", "iconv")),
    ("label_fractional", ("d.jsonl", '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1}\n'),
     ("line 1", "label 0.5 is not a class",)),
    ("label_is_a_list", ("d.jsonl", '{"text": "a", "label": [1]}\n{"text": "b", "label": 0}\n'),
     ("line 1", "expected a label",)),
    ("text_is_a_number", ("d.jsonl", '{"text": "a", "label": 1}\n{"text": 7, "label": 0}\n'),
     ("line 2", "expected text, got int",)),
    ("label_missing", ("d.csv", "text,label\nhi,1\nyo,\n"), ("line 3", "missing label",)),
    ("one_class_only", ("d.csv", "text,label\nhi,1\nyo,1\n"), ("only one label",)),
    ("jsonl_bad_line", ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n'), ("line 2: invalid JSON",)),
    ("jsonl_not_object", ("d.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n'), ("line 2: expected a JSON object",)),
    ("unknown_extension", ("d.xlsx", "x"), ("unknown file type '.xlsx'",)),
    ("chat_not_messages", ("d.jsonl", '{"messages": "hello"}\n', "causal-lm"), ("not a JSON list of messages",)),
    ("chat_ends_with_user", ("d.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "causal-lm"),
     ("the last message must be the assistant's",)),
    ("unknown_task", ("d.csv", "text,label\nhi,1\nyo,0\n", "summarize"), ("unknown task 'summarize'",)),
]:
    CASES[_id] = Case("data", _exp, _data(*_args[:3], **(_args[3] if len(_args) > 3 else {})), f"{_args[0]}: {_args[1]!r:.60}")


@case("data", "does not exist")
def c_data_missing_file(ws):
    """load_examples('classify', 'missing.csv')"""
    from deltatune.data.examples import load_examples

    return None, lambda: load_examples("classify", ws / "missing.csv")


@case("data", "is a directory")
def c_data_is_directory(ws):
    """load_examples('classify', a_directory)"""
    from deltatune.data.examples import load_examples

    (ws / "dir.csv").mkdir()
    return None, lambda: load_examples("classify", ws / "dir.csv")


@case("data", "x.npz")
def c_npz_with_pickled_objects(ws):
    """an .npz whose images are pickled Python objects (np.load allow_pickle=False)"""
    import numpy as np

    from deltatune.data.examples import load_images

    np.savez(ws / "x.npz", images=np.array([object(), object()], dtype=object), labels=np.array([0, 1]))
    return None, lambda: load_images(ws / "x.npz")


@case("data", "not seen in training")
def c_label_unseen_at_eval(ws):
    """evaluation file with a label the model was not trained on"""
    from deltatune.data.examples import load_classify

    (ws / "v.csv").write_text("text,label\nhi,spam\nyo,eggs\n")
    return None, lambda: load_classify(ws / "v.csv", label_names=["ham", "spam"])


# --------------------------------------------------------------------------- command line

def _cli(*args, files: dict[str, str] | None = None):
    def build(ws):
        from typer.testing import CliRunner

        from deltatune import cli

        for name, text in (files or {}).items():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            (ws / name).write_text(text)
        argv = [a.replace("{ws}", str(ws)) for a in args]

        def act():
            r = CliRunner().invoke(cli.app, argv)
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                raise r.exception
            return r.exit_code, r.output
        return None, act
    return build


GOOD_CSV = {"d.csv": "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(10))}
TRAIN = ("train", "--model", "{ws}/no-model", "--data", "{ws}/d.csv", "--output", "{ws}/run")

for _id, _args, _files, _exp in [
    ("cli_missing_data_flag", ("train", "--model", "m"), None, ("Missing option '--data'",)),
    ("cli_unknown_method", TRAIN + ("--method", "lroa"), GOOD_CSV, ("error: unknown method 'lroa'",)),
    ("cli_opt_without_value", TRAIN + ("-o", "r"), GOOD_CSV, ("--opt 'r': expected KEY=VALUE",)),
    ("cli_opt_bad_rank", TRAIN + ("-o", "r=0"), GOOD_CSV, ("r must be a positive integer",)),
    ("cli_opt_unknown_option", TRAIN + ("-o", "rank=4"), GOOD_CSV, ("has no option 'rank'",)),
    ("cli_data_missing", ("train", "--model", "m", "--data", "{ws}/none.csv", "--output", "{ws}/run"), None,
     ("none.csv does not exist",)),
    ("cli_bad_data", TRAIN, {"d.csv": "text\nonly text\n"}, ("cannot tell which column holds the labels",)),
    ("cli_unknown_task", TRAIN + ("--task", "summarize"), GOOD_CSV, ("unknown task 'summarize'",)),
    ("cli_model_missing", TRAIN, GOOD_CSV, ("no-model",)),
    ("cli_config_not_yaml", TRAIN + ("--config", "{ws}/c.yaml"), {**GOOD_CSV, "c.yaml": "a: [1,\n"}, ("not valid YAML",)),
    ("cli_config_unknown_key", TRAIN + ("--config", "{ws}/c.yaml"), {**GOOD_CSV, "c.yaml": "learning_rate: 1\n"},
     ("unknown option 'learning_rate'",)),
    ("cli_config_not_mapping", TRAIN + ("--config", "{ws}/c.yaml"), {**GOOD_CSV, "c.yaml": "- 1\n- 2\n"},
     ("expected a mapping",)),
    ("cli_output_holds_a_run", TRAIN, {**GOOD_CSV, "run/metrics.json": "{}"}, ("already holds a run", "--resume")),
    ("cli_eval_adapter_missing", ("eval", "--adapter", "{ws}/nope", "--data", "{ws}/d.csv"), GOOD_CSV, ("nope",)),
    ("cli_merge_adapter_missing", ("merge", "--adapter", "{ws}/nope", "--output", "{ws}/merged"), None, ("nope",)),
    ("cli_inspect_missing_path", ("inspect", "{ws}/nope"), None, ("nope",)),
]:
    CASES[_id] = Case("cli", _exp, _cli(*_args, files=_files), "deltatune " + " ".join(_args))


# --------------------------------------------------------------------------- HTTP bodies

TOKEN = "t0ken"


def _http(method: str, url: str, body=None, headers=None, raw: bytes | None = None, tok: bool = False, setup=None):
    """A request to a fresh server (tiny Llama, adapters 'a' and a corrupted 'bad' in ws/adapters,
    + whatever ``setup(adapter_dir)`` adds; ``tok``: with the word tokenizer)."""
    def build(ws):
        pytest.importorskip("fastapi")
        import logging

        from fastapi.testclient import TestClient

        from deltatune.serve.app import build_app

        adir = ws / "adapters"
        m = tiny_llama()
        dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj", "v_proj"], name="a"), adir / "a", name="a")
        bad = dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj"], name="bad"), adir / "bad", name="bad")
        (bad / W).write_bytes((bad / W).read_bytes()[:-10])
        if setup is not None:
            setup(adir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("deltatune.serve").setLevel(logging.ERROR)  # the broken adapters are expected
            app = build_app(m, word_tokenizer() if tok else None, adir, token=TOKEN, max_new_tokens=32)

        def act():
            with TestClient(app) as client:
                h = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
                h = {k: v for k, v in h.items() if v is not None}
                kw = {"content": raw, "headers": {**h, "Content-Type": "application/json"}} if raw is not None \
                    else {"json": body, "headers": h}
                r = client.request(method, url, **kw)
            return r.status_code, r.text
        return m, act
    return build


for _id, _req, _exp in [
    ("http_body_not_json", ("POST", "/v1/generate", None, None, b"{not json"), ("invalid request body",)),
    ("http_unknown_field", ("POST", "/v1/generate", {"input_ids": [1], "best_of": 2}), ("invalid request body", "best_of")),
    ("http_bad_temperature", ("POST", "/v1/generate", {"input_ids": [1], "temperature": -1}), ("invalid request body", "temperature")),
    ("http_wrong_type", ("POST", "/v1/generate", {"input_ids": "one two"}), ("invalid request body", "input_ids")),
    ("http_max_new_tokens_zero", ("POST", "/v1/generate", {"input_ids": [1], "max_new_tokens": 0}), ("max_new_tokens",)),
    ("http_max_new_tokens_too_many", ("POST", "/v1/generate", {"input_ids": [1], "max_new_tokens": 10**6}), ("max_new_tokens is at most 32",)),
    ("http_ids_out_of_vocab", ("POST", "/v1/generate", {"input_ids": [1, 10**9]}), ("input_ids must be in [0, 64)",)),
    ("http_empty_prompt", ("POST", "/v1/generate", {"input_ids": []}), ("the prompt is empty",)),
    ("http_no_tokenizer", ("POST", "/v1/generate", {"prompt": "hi"}), ("no tokenizer",)),
    ("http_unknown_adapter", ("POST", "/v1/generate", {"adapter": "zz", "input_ids": [1]}), ("adapter 'zz' is not loaded",)),
    ("http_adapter_traversal", ("POST", "/v1/generate", {"adapter": "../a", "input_ids": [1]}), ("invalid adapter name '../a'",)),
    ("http_wrong_endpoint", ("POST", "/v1/classify", {"input_ids": [1]}), ("hosts a causal LM", "/v1/generate")),
    ("http_load_without_token", ("POST", "/v1/adapters", {"name": "a"}, {"Authorization": None}), ("missing 'Authorization",)),
    ("http_load_wrong_token", ("POST", "/v1/adapters", {"name": "a"}, {"Authorization": "Bearer nope"}), ("invalid token",)),
    ("http_load_traversal", ("POST", "/v1/adapters", {"name": "../../etc"}), ("invalid adapter name '../../etc'",)),
    ("http_load_absent", ("POST", "/v1/adapters", {"name": "zz"}), ("no adapter 'zz' in the adapter directory",)),
    ("http_load_name_not_string", ("POST", "/v1/adapters", {"name": ["a"]}), ("invalid adapter name",)),
    ("http_load_already_loaded", ("POST", "/v1/adapters", {"name": "a"}), ("already loaded",)),
    ("http_load_corrupted", ("POST", "/v1/adapters", {"name": "bad"}), ("adapter_model.safetensors", "checksum mismatch")),
    ("http_delete_unknown", ("DELETE", "/v1/adapters/zz", None), ("adapter 'zz' is not loaded",)),
    ("http_delete_without_token", ("DELETE", "/v1/adapters/a", None, {"Authorization": None}), ("missing 'Authorization",)),
]:
    CASES[_id] = Case("http", _exp, _http(*_req), f"{_req[0]} {_req[1]} {_req[2]!r:.60}")


def _hostile(kind: str):
    """A ``setup`` adding adapter 'x' to the server's directory: FIFO weights, weights linked to a
    file outside, a rank of 3e6 in its config, or the directory itself a symlink to outside."""
    def setup(adir):
        import json
        import os

        src = dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj"], name="x"), adir.parent / "outside", name="x")
        if kind == "dir_link":
            (adir / "x").symlink_to(src)
            return
        d = adir / "x"
        src.rename(d)
        (d / "deltatune.json").unlink()
        if kind == "fifo":
            (d / W).unlink()
            os.mkfifo(d / W)
        elif kind == "passwd":
            (d / W).unlink()
            (d / W).symlink_to("/etc/passwd")
        elif kind == "rank":
            cfg = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3_000_000}))
    return setup


SURROGATE = b'{"prompt": "w1 \\ud800", "max_new_tokens": 2}'  # valid JSON, not valid UTF-8 text

for _id, _req, _kw, _exp in [
    ("http_prompt_over_context", ("POST", "/v1/generate", {"input_ids": [3] * 60, "max_new_tokens": 30}), {},
     ("the prompt has 60 tokens", "64 positions", "at most 34")),
    ("http_prompt_too_many_characters", ("POST", "/v1/generate", {"prompt": "w1 " * 400, "max_new_tokens": 2}),
     {"tok": True}, ("1200 characters", "at most 1024")),
    ("http_body_too_large", ("POST", "/v1/generate", {"prompt": "w1 " * 100_000}), {"tok": True},
     ("request body is larger than this server accepts",)),
    ("http_prompt_lone_surrogate", ("POST", "/v1/generate", None, None, SURROGATE), {"tok": True},
     ("not valid Unicode", "lone surrogate")),
    ("http_delete_name_with_newline", ("DELETE", "/v1/adapters/a%0A", None), {}, ("invalid adapter name 'a",)),
    ("http_load_name_with_newline", ("POST", "/v1/adapters", {"name": "a\n"}), {}, ("invalid adapter name 'a",)),
    ("http_load_fifo_weights", ("POST", "/v1/adapters", {"name": "x"}), {"setup": _hostile("fifo")},
     ("x/adapter_model.safetensors: not a regular file",)),
    ("http_load_weights_link_to_passwd", ("POST", "/v1/adapters", {"name": "x"}), {"setup": _hostile("passwd")},
     ("x/adapter_model.safetensors: a symlink pointing outside the adapter directory",)),
    ("http_load_rank_3e6", ("POST", "/v1/adapters", {"name": "x"}), {"setup": _hostile("rank")},
     ("r=3000000 is larger than any dimension",)),
    ("http_load_dir_link_outside", ("POST", "/v1/adapters", {"name": "x"}), {"setup": _hostile("dir_link")},
     ("adapter 'x' resolves outside the adapter directory",)),
]:
    CASES[_id] = Case("http", _exp, _http(*_req, **_kw), f"{_req[0]} {_req[1]} {(_req[4] if len(_req) > 4 else _req[2])!r:.60}")
