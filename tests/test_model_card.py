"""Model cards (deltatune.model_card): README.md with Hugging Face front matter in every saved
adapter and merged model; parsed back with yaml as the Hub would."""
import json
import os
import stat

import yaml
from typer.testing import CliRunner

import deltatune as dt
from cli_fixtures import spam_rows, tiny_bert_dir, write_csv
from conftest import tiny_llama
from deltatune.cli.main import app


def front_matter(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text.split("---\n", 2)[1:]
    return yaml.safe_load(head), body


def test_save_writes_a_minimal_card_with_the_real_base_path(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained("base")  # typed as a relative path
    dt.attach(model, "lora", targets=["q_proj"], r=4)
    dt.save(model, tmp_path / "a")
    meta, body = front_matter(tmp_path / "a" / "README.md")
    real = str(tmp_path / "base")
    assert meta == {"base_model": real, "library_name": "deltatune", "tags": ["deltatune", "lora"]}
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == real
    from safetensors.torch import load_file

    n = sum(v.numel() for v in load_file(tmp_path / "a" / "adapter_model.safetensors").values())
    total = sum(p.numel() for p in model.parameters())
    assert '- **Method:** `lora` with `{"alpha": 16' in body
    assert f"- **Trainable parameters:** {n:,} of {total:,} ({100 * n / total:.3f} %)" in body


def test_a_users_own_readme_is_kept(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "README.md").write_text("# my notes\n")
    m = dt.attach(tiny_llama(), "lora", targets=["q_proj"], r=4)
    dt.save(m, d)
    assert (d / "README.md").read_text() == "# my notes\n"
    fifo = tmp_path / "f"
    fifo.mkdir()
    os.mkfifo(fifo / "README.md")  # neither read (it would block) nor replaced
    dt.save(m, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo / "README.md").st_mode) and (fifo / "adapter_config.json").exists()
    dt.save(m, tmp_path / "b")
    dt.save(m, tmp_path / "b")  # our own card is refreshed
    assert front_matter(tmp_path / "b" / "README.md")[0]["library_name"] == "deltatune"


def test_train_and_merge_cards(tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    data = write_csv(tmp_path / "spam.csv", spam_rows(32))
    run = CliRunner().invoke(app, ["train", "--model", str(bert), "--data", str(data), "--output", str(tmp_path / "r"),
                                   "--max-steps", "4", "--batch-size", "8", "--no-progress", "--json", "-o", "r=4"])
    assert run.exit_code == 0, run.output
    m = json.loads(run.stdout)
    meta, body = front_matter(tmp_path / "r" / "adapter" / "README.md")
    assert meta == {"base_model": str(bert.resolve()), "library_name": "deltatune",
                    "tags": ["deltatune", "lora", "classify"], "datasets": ["spam.csv"],
                    "metrics": ["accuracy", "f1", "loss"], "pipeline_tag": "text-classification"}
    assert f"{m['trainable_params']:,} of {m['total_params']:,}" in body and "--opt r=4" in body
    assert f"| accuracy | {m['before']['accuracy']:.4f} | {m['after']['accuracy']:.4f} |" in body
    assert f"**Forgetting** (representation_drift, on general reference text): {m['forgetting']['value']:.4f}" in body
    r = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "r"), "--output", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    meta, body = front_matter(tmp_path / "merged" / "README.md")
    assert meta["tags"] == ["deltatune", "lora", "classify", "merged"] and meta["base_model"] == str(bert.resolve())
    assert str((tmp_path / "r" / "adapter").resolve()) in body
    assert f"| accuracy | {m['before']['accuracy']:.4f} | {m['after']['accuracy']:.4f} |" in body
