"""Model cards: a README.md in every saved adapter (and merged model) directory, in the Hugging Face
convention -- YAML front matter the Hub reads, then a human body:

    ---
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct      (the real id, or the absolute local path)
    library_name: deltatune
    tags: [deltatune, lora, causal-lm]
    datasets: [chat.jsonl]
    metrics: [perplexity]
    ---
    # lora adapter for ...   method, trainable %, data, command, config, metrics before/after, forgetting

``dt.save`` writes the minimal card (what the model and the adapter know); ``deltatune train``
rewrites it with the run: data, the exact command and resolved config, metrics and forgetting.
The front matter is written as JSON flow values (valid YAML), so the core needs no YAML library.
A README.md that deltatune did not write (no ``library_name: deltatune``) is never overwritten.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import files

README = "README.md"
MARKERS = ('library_name: "deltatune"', "library_name: deltatune")
PIPELINE = {"causal-lm": "text-generation", "classify": "text-classification",
            "image-classify": "image-classification"}


def _json(v) -> str:
    """JSON text (valid YAML flow style); sets sorted, anything else unusual as its str."""
    return json.dumps(v, ensure_ascii=False, sort_keys=isinstance(v, dict),
                      default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o))


def front_matter(fields: dict[str, Any]) -> str:
    lines = ["---"]
    for k, v in fields.items():
        if v is None or v == []:
            continue
        lines.append(f"{k}: {_json(v)}")
    return "\n".join(lines + ["---", ""])


def may_write(directory: str | os.PathLike) -> bool:
    """False when the directory holds a README.md that deltatune did not write."""
    import stat

    p = Path(directory) / README
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):  # a symlink, FIFO or device: not ours, never read
            return False
        with open(p, "rb") as f:
            head = f.read(2000).decode("utf-8", errors="replace")
        return any(m in head for m in MARKERS)
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def card(*, base_model: str | None, method: str, method_config: dict | None = None, task: str | None = None,
         trainable: int | None = None, total: int | None = None, datasets: list[str] | None = None,
         data: str | None = None, metrics: dict[str, tuple[Any, Any]] | None = None, main_metric: str | None = None,
         forgetting: dict | None = None, command: str | None = None, config: dict | None = None,
         merged_from: str | None = None, gguf_file: str | None = None, pooling: dict | None = None) -> str:
    """The README.md text. ``metrics``: name -> (before, after); ``gguf_file``: a merged model
    exported as that GGUF file (tagged ``gguf``, as the Hub lists such repositories); ``pooling``:
    the sentence-transformers pooling the head read (deltatune/text/classifier.py), or None."""
    tags = (["deltatune", method] + ([task] if task else []) + (["merged"] if merged_from else [])
            + (["gguf"] if gguf_file else []))
    head = front_matter({
        "base_model": base_model, "library_name": "deltatune", "tags": tags, "datasets": datasets or [],
        "metrics": ([main_metric] if main_metric else []) + sorted(set(metrics or {}) - {main_metric}),
        "pipeline_tag": PIPELINE.get(task or ""),
    })
    what = "model (adapter merged into the base weights)" if merged_from else "adapter"
    body = [f"# {method} {what} for {base_model or 'an unnamed model'}", ""]
    if merged_from and gguf_file:
        body += [f"Merged from the adapter `{merged_from}` with `deltatune merge --format gguf`: `{gguf_file}` "
                 "runs in llama.cpp / ollama and loads with `transformers`' "
                 f"`from_pretrained(THIS_DIR, gguf_file=\"{gguf_file}\")`.", ""]
    elif merged_from:
        body += [f"Merged from the adapter `{merged_from}` with `deltatune merge`; loads with "
                 "`transformers`' `from_pretrained`.", ""]
    body += [f"- **Method:** `{method}`" + (f" with `{_json(method_config)}`"
                                           if method_config else "")]
    if trainable is not None and total:
        body += [f"- **Trainable parameters:** {trainable:,} of {total:,} ({100 * trainable / total:.3f} %)"]
    if task:
        body += [f"- **Task:** {task}"]
    if pooling:  # peft / transformers users must not expect AutoModelForSequenceClassification to match
        how = pooling.get("pooling", "mean") + ("-pooled, L2-normalised" if pooling.get("normalize") else "-pooled")
        body += [f"- **Head:** a linear classifier on the base's {how} token states (the sentence embedding its "
                 "`modules.json` declares), rebuilt by deltatune on load; transformers' "
                 "`AutoModelForSequenceClassification` (and peft on it) reads `pooler([CLS])` instead and will not "
                 "reproduce these results"]
    if data:
        body += [f"- **Data:** {data}"]
    if command:
        body += ["", "## How it was trained", "", "```bash", command, "```"]
    if config:
        body += ["", "Resolved configuration (usable as `deltatune train --config FILE.yaml`):", "", "```yaml"]
        body += [f"{k}: {_json(v)}" for k, v in config.items()] + ["```"]
    if metrics:
        body += ["", "## Results (validation split)", "", "| metric | before | after |", "|---|---:|---:|"]
        body += [f"| {k} | {_fmt(b)} | {_fmt(a)} |" for k, (b, a) in metrics.items()]
    if forgetting:
        unit = " %" if forgetting.get("kind") == "perplexity_change" else ""
        body += ["", f"**Forgetting** ({forgetting.get('kind')}, on general reference text): "
                     f"{_fmt(forgetting.get('value'))}{unit}"]
    elif metrics is not None:
        body += ["", "**Forgetting:** not measured."]
    body += ["", "## Use", "", "```python", "import deltatune as dt",
             "# model = <the base model above, loaded with transformers>", "dt.load(model, \"PATH/TO/THIS/DIR\")",
             "```", ""]
    return head + "\n".join(body)


def write(directory: str | os.PathLike, text: str) -> bool:
    """Write README.md atomically unless a user's own README.md is there; True if written."""
    if not may_write(directory):
        return False
    files.atomic_write(Path(directory) / README, text.encode("utf-8"))  # looked up at call time (tests patch it)
    return True
