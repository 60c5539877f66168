"""Data loading: formats, splits, and clear errors naming file, row and column."""
import json

import numpy as np
import pytest

from deltatune import DeltaError
from deltatune.data.examples import (collate, load_causal_lm, load_classify, load_examples, load_images, read_table,
                                     split_validation)


def test_csv_labels_sorted_and_strings(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nhello,b\nworld,a\nagain,b\n", encoding="utf-8")
    ex = load_classify(p)
    assert ex.label_names == ["a", "b"] and ex.labels == [1, 0, 1] and ex.rows[0] == "hello"


def test_integer_labels_sort_numerically(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}", "y": y}) + "\n" for i, y in enumerate([10, 2, 2, 10, 1])))
    ex = load_classify(p, label_column="y")
    assert ex.label_names == ["1", "2", "10"] and ex.labels == [2, 1, 1, 2, 0]


def test_parquet(tmp_path):
    import pandas as pd

    p = tmp_path / "d.parquet"
    pd.DataFrame({"sentence": ["a b", "c d", "e f"], "class": [0, 1, 0]}).to_parquet(p)
    ex = load_classify(p)  # columns guessed: sentence / class
    assert ex.labels == [0, 1, 0] and ex.rows == ["a b", "c d", "e f"]


def test_missing_column_lists_existing(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("body,spam\nhi,0\nyo,1\n")
    with pytest.raises(DeltaError, match=r"no column 'text'.*columns are \['body', 'spam'\]"):
        load_classify(p, text_column="text", label_column="spam")
    with pytest.raises(DeltaError, match=r"which column holds the text.*\['body', 'spam'\].*--text-column"):
        load_classify(p)


def test_empty_file_and_header_only(tmp_path):
    p = tmp_path / "e.csv"
    p.write_bytes(b"")
    with pytest.raises(DeltaError, match=r"e\.csv: the file is empty"):
        read_table(p)
    p.write_text("text,label\n")
    with pytest.raises(DeltaError, match=r"e\.csv: no data rows"):
        read_table(p)


def test_non_utf8_names_line(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\nok,0\ncaf\xe9 au lait,1\n".encode("latin-1"))
    with pytest.raises(DeltaError, match=r"latin\.csv: line 3 is not valid UTF-8.*0xe9"):
        load_classify(p)


def test_wrong_types_name_line_and_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine", "label": 0}\n{"text": 42, "label": 1}\n')
    with pytest.raises(DeltaError, match=r"d\.jsonl: line 2, column 'text': expected text, got int 42"):
        load_classify(p)
    p.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 0.5}\n')
    with pytest.raises(DeltaError, match=r"line 2, column 'label': label 0.5 is not a class"):
        load_classify(p)
    p.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": [1]}\n')
    with pytest.raises(DeltaError, match=r"line 2, column 'label': expected a label.*list"):
        load_classify(p)
    p.write_text('{"text": "a", "label": 0}\n\n{"label": 1}\n')  # blank line skipped: still line 3
    with pytest.raises(DeltaError, match=r"line 3, column 'text': missing value"):
        load_classify(p)


def test_csv_missing_label_names_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,0\nb,\nc,1\n")
    with pytest.raises(DeltaError, match=r"d\.csv: line 3, column 'label': missing label"):
        load_classify(p)


def test_unknown_label_at_eval(tmp_path):
    p = tmp_path / "eval.csv"
    p.write_text("text,label\na,ham\nb,eggs\n")
    with pytest.raises(DeltaError, match=r"eval\.csv: line 3, column 'label': label 'eggs' was not seen in training; "
                                         r"the model knows \['ham', 'spam'\]"):
        load_classify(p, label_names=["ham", "spam"])


def test_bad_json_line_and_unknown_suffix(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 0}\n{"text": \n')
    with pytest.raises(DeltaError, match=r"d\.jsonl: line 2: invalid JSON"):
        read_table(p)
    q = tmp_path / "d.xlsx"
    q.write_text("x")
    with pytest.raises(DeltaError, match=r"unknown file type '\.xlsx'"):
        read_table(q)
    with pytest.raises(DeltaError, match=r"does not exist"):
        read_table(tmp_path / "nope.csv")


def test_single_label_refused(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DeltaError, match=r"only one label"):
        load_classify(p)


def test_causal_lm_shapes(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"prompt": "hi", "response": "hello"}\n')
    ex = load_causal_lm(p)
    assert ex.format == "prompt-completion" and ex.rows == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "plain": "hi\n"}]
    p.write_text('{"text": "just text"}\n')
    assert load_causal_lm(p).rows == [{"text": "just text"}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    assert load_causal_lm(p).rows == [{"messages": msgs}]
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(DeltaError, match=r"line 1, column 'messages': the last message must be the assistant's"):
        load_causal_lm(p)


def test_causal_lm_labels_mask_prompt(tmp_path):
    from deltatune.data.examples import Examples, encode
    from cli_fixtures import make_tokenizer

    tok, _ = make_tokenizer(tmp_path / "tok")
    ex = Examples("causal-lm", [("hello", "hi there")])
    f = encode(ex, tok, max_length=64)[0]
    n_prompt = len(tok("hello\n", add_special_tokens=False)["input_ids"])
    assert f["labels"][:n_prompt] == [-100] * n_prompt and f["labels"][n_prompt:] == f["input_ids"][n_prompt:]
    b = collate([f, {"input_ids": [5], "labels": [5]}], pad_id=0)
    assert b["input_ids"].shape == b["labels"].shape == (2, len(f["input_ids"]))
    assert b["labels"][1, 1:].eq(-100).all() and b["attention_mask"][1].sum() == 1


def test_split_validation_is_seeded_and_disjoint(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(50)))
    ex = load_classify(p)
    tr, va = split_validation(ex, 0.1, seed=3)
    tr2, va2 = split_validation(ex, 0.1, seed=3)
    assert len(va) == 5 and len(tr) == 45 and va.rows == va2.rows
    assert not set(tr.rows) & set(va.rows)
    assert va.line_of and all(2 <= n <= 51 for n in va.line_of)


def test_images_npz_and_folder(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=np.random.randint(0, 255, (6, 8, 8)).astype(np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]))
    ex = load_images(p)
    assert len(ex) == 6 and ex.rows[0].shape == (8, 8, 1) and ex.rows[0].max() <= 1.0
    np.savez(p, pics=np.zeros((2, 8, 8)))
    with pytest.raises(DeltaError, match=r"no array 'images'; arrays are \['pics'\]"):
        load_images(p)
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "imgs" / c / "a.png")
    ex = load_examples("image-classify", tmp_path / "imgs")
    assert ex.label_names == ["cat", "dog"] and ex.rows[0].shape == (4, 4, 3)


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    from deltatune.app.evaluate import macro_f1

    g, p = [0, 1, 2, 2, 1, 0, 0], [0, 2, 2, 2, 1, 1, 0]
    assert macro_f1(g, p) == pytest.approx(f1_score(g, p, average="macro", zero_division=0))
    assert macro_f1([0, 0], [1, 1]) == pytest.approx(f1_score([0, 0], [1, 1], average="macro", zero_division=0))
