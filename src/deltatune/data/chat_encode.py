"""Causal-LM records -> token ids and labels, through the tokenizer's own chat template, tokenized
once with ``datasets.map`` and cached on disk.

    record ──render──► text + trainable character spans ──tokenizer(offsets)──► input_ids, labels
                                                                                (-100 outside the spans)

Which characters train (``train_on="responses"``, the default):

    chat / instruction rows   every assistant turn: its content and the template's end-of-turn marker
                              (``Hello.<|im_end|>``), found by rendering the conversation up to that
                              turn (``add_generation_prompt=True``) and through it; system / user turns
                              and the role headers are masked
    single-turn rows without  the completion + EOS after ``record["plain"]`` (Alpaca's own prompt for
    a chat template           alpaca rows, ``prompt\\n`` for prompt/completion rows)
    text rows                 every token (+ EOS)

``train_on="prompt+response"`` trains every token.  Tokenization goes through the character
offsets of one call on the whole rendered text, so the ids are exactly what the model sees when
the same template renders a conversation at inference time.

Cache: ``$DELTATUNE_CACHE/tokenized/<key>.arrow`` where the key hashes the rows' content (so it
changes with the file), the tokenizer (vocabulary, chat template, special tokens) and the settings
(max_length, train_on); a second run with the same data and model loads the ids without calling
the tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

from .chat_formats import as_record
from ..core.delta import DeltaError
from .tables import CHARS_PER_TOKEN
from .sources import quiet_datasets
from ..models import cache_root

TRAIN_ON = ("responses", "prompt+response")
CACHE_VERSION = 1  # bump when the rendering or masking rules change: old cache files stop matching

# Named templates for --chat-template (base models ship none).  ChatML is what SmolLM2, Qwen and
# many others use; the assistant turn ends with <|im_end|>, which is trained so the model stops.
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
               "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
}


def chat_template_text(value: str) -> str:
    """``--chat-template``: a file holding a Jinja template, a Jinja string, or a name in CHAT_TEMPLATES."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    p = Path(value).expanduser()
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        if text.lstrip().startswith("{") and '"chat_template"' in text:  # a tokenizer_config.json
            text = json.loads(text)["chat_template"]
        return text
    if "{{" in value or "{%" in value:
        return value
    raise DeltaError(f"--chat-template {value!r}: not a file, not a Jinja template ({{% ... %}}) and not one of "
                     f"{sorted(CHAT_TEMPLATES)}")


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply(tokenizer, msgs, generation: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    except (TemplateError, ValueError) as e:  # a template that raises ("roles must alternate") says why
        raise DeltaError(f"the chat template refused a conversation ({type(e).__name__}: {e}); roles were "
                         f"{[m['role'] for m in msgs]}") from None


def _no_template(tokenizer, n_turns: int) -> DeltaError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return DeltaError(f"the tokenizer of {name} has no chat template, which chat rows ({n_turns} messages) need; "
                      f"pass --chat-template FILE.jinja (or a Jinja string, or 'chatml'), or --format text")


def render(record: dict, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(text, trainable character spans [start, end)) of one record (see the module docstring)."""
    eos = tokenizer.eos_token or ""
    if "text" in record:
        text = record["text"] + eos
        return text, [(0, len(text))]
    msgs = record["messages"]
    if has_template(tokenizer):
        return _render_chat(msgs, tokenizer)
    if "plain" in record:  # single-turn instruction row, no template: prompt text + completion + EOS
        prompt, response = record["plain"], msgs[-1]["content"] + eos
        return prompt + response, [(len(prompt), len(prompt) + len(response))]
    raise _no_template(tokenizer, len(msgs))


def _render_chat(msgs: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    full = _apply(tokenizer, msgs)
    spans, pos = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _apply(tokenizer, msgs[:i], generation=True) if i else None
        through = _apply(tokenizer, msgs[: i + 1])
        if before is not None and full.startswith(through) and through.startswith(before):
            # the turn as the template writes it: content + end-of-turn marker (trailing newline untrained)
            start, end = len(before), len(through.rstrip())
        else:  # a template that rewrites earlier turns (or a leading assistant turn): find the content itself
            start = full.find(m["content"], pos)
            if start < 0:
                raise DeltaError(f"the chat template does not write assistant turn {i + 1} verbatim "
                                 f"({m['content'][:40]!r}); pass a --chat-template that keeps it")
            end = start + len(m["content"])
        spans.append((start, end))
        pos = end
    return full, spans


def render_prompt(tokenizer, prompt: str) -> str:
    """A user prompt as the model sees it before generating (chat template if there is one)."""
    if has_template(tokenizer):
        return _apply(tokenizer, [{"role": "user", "content": prompt}], generation=True)
    return f"{prompt}\n" if prompt else ""


# --------------------------------------------------------------------------- tokenize + mask

def _token_ids(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Ids and character offsets of each text (one call on the whole text: the ids inference sees)."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    head_ids, head_labels = ids[:max_length], labels[:max_length]
    if len(ids) > max_length and all(t == -100 for t in head_labels[1:]):
        return ids[-max_length:], labels[-max_length:]  # the prompt filled max_length: keep the tail
    return head_ids, head_labels


def _labels(ids, offsets, spans, train_on: str) -> list[int]:
    if train_on == "prompt+response":
        return list(ids)
    # a token trains if its characters overlap a trainable span
    return [t if any(a < e and max(b, a + 1) > s for s, e in spans) else -100 for t, (a, b) in zip(ids, offsets)]


def _tokenize_batch(batch: dict, tokenizer, max_length: int, train_on: str) -> dict:
    rendered = [render(json.loads(r), tokenizer) for r in batch["row"]]
    # only the first max_length * CHARS_PER_TOKEN characters can hold the kept tokens: a tokenizer
    # given a whole 20 MB text builds every token and offset before truncating (GBs of memory)
    cap = max(1, max_length) * CHARS_PER_TOKEN
    all_ids, all_offsets = _token_ids(tokenizer, [t[:cap] for t, _ in rendered])
    out_ids, out_labels = [], []
    for ids, offsets, (text, spans) in zip(all_ids, all_offsets, rendered):
        labels = _labels(ids, offsets, spans, train_on)
        if len(text) > cap and len(ids) > max_length and all(t == -100 for t in labels[1:max_length]):
            # the prompt fills max_length, so _truncate keeps the tail: that of the whole text
            shift = len(text) - cap
            (ids,), (offsets,) = _token_ids(tokenizer, [text[-cap:]])
            labels = _labels(ids, [(a + shift, b + shift) for a, b in offsets], spans, train_on)
            ids, labels = list(ids)[-max_length:], labels[-max_length:]
        else:
            ids, labels = _truncate(list(ids), labels, max_length)
        out_ids.append(ids)
        out_labels.append(labels)
    return {"input_ids": out_ids, "labels": out_labels}


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: vocabulary + merges + normalizer (tokenizer.json), chat template,
    special tokens; not the directory it was loaded from."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.eos_token,
                   getattr(tokenizer, "bos_token", None))).encode())
    return h.hexdigest()


def cache_key(rows_json: list[str], tokenizer, max_length: int, train_on: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{max_length}|{train_on}|{tokenizer_fingerprint(tokenizer)}".encode())
    for r in rows_json:
        h.update(r.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def encode_causal_lm(rows, tokenizer, max_length: int = 256, train_on: str = "responses",
                     cache: bool = True) -> list[dict]:
    """Records (or legacy (prompt, response) pairs) -> [{"input_ids", "labels"}], cached on disk."""
    import datasets

    if train_on not in TRAIN_ON:
        raise DeltaError(f"unknown --train-on {train_on!r}; choose one of {list(TRAIN_ON)}")
    if not getattr(tokenizer, "is_fast", True):
        raise DeltaError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer without character offsets; "
                         "load the model's fast tokenizer (tokenizer.json)")
    quiet_datasets()
    rows_json = [json.dumps(as_record(r), sort_keys=True, ensure_ascii=False) for r in rows]
    fn = partial(_tokenize_batch, tokenizer=tokenizer, max_length=max_length, train_on=train_on)
    ds = datasets.Dataset.from_dict({"row": rows_json})
    kw: dict = {}
    if cache:
        key = cache_key(rows_json, tokenizer, max_length, train_on)
        d = cache_root() / "tokenized"
        d.mkdir(parents=True, exist_ok=True)
        kw = {"cache_file_name": str(d / f"{key}.arrow"), "load_from_cache_file": True, "new_fingerprint": key}
    else:
        kw = {"keep_in_memory": True, "new_fingerprint": "nocache"}
    ds = ds.map(fn, batched=True, batch_size=256, remove_columns=["row"], **kw)
    return ds.to_list()
