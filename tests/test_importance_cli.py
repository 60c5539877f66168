"""`deltatune importance`: ranked table, plot and a LoRA config for a budget, on a tiny BERT."""
import json

from typer.testing import CliRunner

import deltatune as dt
from cli_fixtures import spam_rows, tiny_bert_dir, write_csv
from deltatune.cli.main import app


def test_importance_command_table_plot_and_budget(tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    data = write_csv(tmp_path / "train.csv", spam_rows(32))
    out = tmp_path / "imp"
    r = CliRunner().invoke(app, ["importance", "--model", str(bert), "--data", str(data), "--output", str(out),
                                 "--budget", "2000", "--max-batches", "2", "--batch-size", "8", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads(r.stdout)
    scores = [row["taylor"] for row in res["rows"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert (out / "importance.png").stat().st_size > 0 and (out / "importance.txt").exists()
    opts = json.loads((out / "lora_options.json").read_text())
    assert opts["targets"] and "classifier" not in opts["targets"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    dt.attach(model, "lora", modules_to_save=None, **opts)
    lora = sum(t.numel() for t in dt.adapter_tensors(model, "default").values())
    assert 0 < lora <= 2000


def test_importance_command_bad_metric(tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    data = write_csv(tmp_path / "train.csv", spam_rows(16))
    r = CliRunner().invoke(app, ["importance", "--model", str(bert), "--data", str(data), "--metric", "nope",
                                 "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and "metric must be one of" in r.output
