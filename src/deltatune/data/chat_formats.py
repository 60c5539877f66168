"""Causal-LM training data in the formats people already have, detected from the columns.

    table ──detect_format(columns)──► Format ──rows()──► records ──chat_encode──► token ids + labels

A *record* is the one shape every format becomes, a small JSON-able dict:

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   chat: loss on assistant turns
    {"messages": [...], "plain": str}   single-turn instruction rows; ``plain`` is the prompt text used
                                        when the tokenizer has no chat template (no template needed)
    {"text": str}                       plain text (continued pre-training): loss on every token

Formats (``--format`` forces one; otherwise the first whose columns are present wins, in this order):

    messages           ``messages``: [{"role", "content"}, ...]                    (OpenAI / TRL)
    sharegpt           ``conversations``: [{"from": human|gpt|system, "value"}, ...] (ShareGPT / FastChat)
    alpaca             ``instruction``, optional ``input``, ``output`` (+ optional ``system``)
    prompt-completion  prompt-like + response-like columns (prompt/completion, question/answer, ...)
    text               one text column
    classification     text + label (``--task classify``; handled by :func:`deltatune.data.load_classify`)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.delta import DeltaError
# the table readers are below this module (tables.py); examples.load_causal_lm calls into it
from .tables import (PROMPT_GUESSES, RESPONSE_GUESSES, TEXT_GUESSES, _is_missing, _lines, _text_values, _where,
                     pick_column, read_table)

# Stanford Alpaca's own prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT): what alpaca rows
# become when the tokenizer has no chat template, so base models train on the format they were shown.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# ShareGPT speaker names (FastChat, LLaMA-Factory, axolotl use these) -> chat-template roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    detect: Callable[[dict[str, str]], bool]  # lower-cased column name -> column; True if the format fits
    rows: Callable[["Table", dict], list[dict]]  # the table + --*-column options -> records


@dataclass
class Table:
    """A DataFrame with where it came from, so errors name the file, line and column."""

    df: Any
    path: Path
    lines: list[int]

    def column(self, given: str | None, guesses, role: str, flag: str) -> str:
        return pick_column(self.df, self.path, given, guesses, role, flag)

    def texts(self, col: str, optional: bool = False) -> list[str]:
        if optional:  # alpaca's ``input`` is often empty or null: that means "no input"
            return ["" if _is_missing(v) else str(v) for v in self.df[col].tolist()]
        return _text_values(self.df, col, self.path, self.lines)

    def where(self, line: int, col: str) -> str:
        return f"{_where(self.path, line)}, column {col!r}"


# --------------------------------------------------------------------------- conversations

def _turn(m, where: str) -> dict:
    """One turn: OpenAI style {"role", "content"} or ShareGPT style {"from", "value"}."""
    if isinstance(m, dict) and "role" in m and "content" in m:
        role, content = str(m["role"]), m["content"]
    elif isinstance(m, dict) and "from" in m and "value" in m:
        speaker = str(m["from"]).lower()
        if speaker not in SHAREGPT_ROLES:
            raise DeltaError(f"{where}: unknown speaker {m['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        role, content = SHAREGPT_ROLES[speaker], m["value"]
    else:
        raise DeltaError(f"{where}: expected a list of {{\"role\", \"content\"}} (or ShareGPT {{\"from\", "
                         f"\"value\"}}) messages, got {str(m)[:60]!r}")
    return {"role": role, "content": "" if content is None else str(content)}


def _conversation(table: Table, col: str) -> list[dict]:
    """Each cell: a list (or JSON text of a list) of turns -> {"messages": [...]} records."""
    out = []
    for v, line in zip(table.df[col].tolist(), table.lines):
        where = table.where(line, col)
        if v is None or (isinstance(v, float) and v != v):  # absent in this row (NaN from pandas)
            raise DeltaError(f"{where}: missing value; every row needs a list of messages")
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                raise DeltaError(f"{where}: not a JSON list of messages") from None
        if hasattr(v, "tolist"):  # numpy arrays from parquet / arrow
            v = v.tolist()
        if not isinstance(v, list) or not v:
            raise DeltaError(f"{where}: expected a non-empty list of messages, got {type(v).__name__}")
        msgs = [_turn(m, where) for m in v]
        if msgs[-1]["role"] != "assistant":
            raise DeltaError(f"{where}: the last message must be the assistant's (got role "
                             f"{msgs[-1]['role']!r}); it is what the model learns to write")
        out.append({"messages": msgs})
    return out


def _messages_rows(table: Table, cols: dict) -> list[dict]:
    col = table.column(cols.get("messages_column"), ("messages",), "chat messages", "--messages-column")
    return _conversation(table, col)


def _sharegpt_rows(table: Table, cols: dict) -> list[dict]:
    col = table.column(cols.get("messages_column"), ("conversations", "conversation"), "conversations",
                       "--messages-column")
    return _conversation(table, col)


# --------------------------------------------------------------------------- single turn

def _single_turn(prompt: str, response: str, plain: str, system: str = "") -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": msgs, "plain": plain}


def _alpaca_rows(table: Table, cols: dict) -> list[dict]:
    icol = table.column(cols.get("prompt_column"), ("instruction",), "instructions", "--prompt-column")
    ocol = table.column(cols.get("response_column"), ("output",), "outputs", "--response-column")
    lower = {c.lower(): c for c in table.df.columns}
    inputs = table.texts(lower["input"], optional=True) if "input" in lower else [""] * len(table.df)
    systems = table.texts(lower["system"], optional=True) if "system" in lower else [""] * len(table.df)
    out = []
    for ins, inp, resp, sys_ in zip(table.texts(icol), inputs, table.texts(ocol), systems):
        # the input is part of the user turn: "instruction\n\ninput" (LLaMA-Factory, axolotl do the same)
        user = f"{ins}\n\n{inp}" if inp.strip() else ins
        plain = (ALPACA_PROMPT.format(instruction=ins, input=inp) if inp.strip()
                 else ALPACA_PROMPT_NO_INPUT.format(instruction=ins))
        out.append(_single_turn(user, resp, plain, sys_))
    return out


def _prompt_completion_rows(table: Table, cols: dict) -> list[dict]:
    pcol = table.column(cols.get("prompt_column"), PROMPT_GUESSES, "prompts", "--prompt-column")
    rcol = table.column(cols.get("response_column"), RESPONSE_GUESSES, "responses", "--response-column")
    return [_single_turn(p, r, f"{p}\n" if p else "") for p, r in zip(table.texts(pcol), table.texts(rcol))]


def _text_rows(table: Table, cols: dict) -> list[dict]:
    col = table.column(cols.get("text_column"), TEXT_GUESSES, "text", "--text-column (or --format with "
                       f"one of {sorted(FORMATS)})")
    return [{"text": t} for t in table.texts(col)]


def _classification_rows(table: Table, cols: dict) -> list[dict]:
    raise DeltaError(f"{table.path}: --format classification is for --task classify; for a causal LM choose "
                     f"one of {sorted(n for n in FORMATS if n != 'classification')}")


def _has(*names: str) -> Callable[[dict], bool]:
    return lambda lower: all(n in lower for n in names)


def _prompt_and_response(lower: dict) -> bool:
    return any(g in lower for g in PROMPT_GUESSES) and any(g in lower for g in RESPONSE_GUESSES)


# detection order matters: alpaca's columns would also pass as prompt/completion
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("messages", "messages: [{role, content}, ...] (OpenAI / TRL)", _has("messages"), _messages_rows),
    Format("sharegpt", "conversations: [{from, value}, ...] (ShareGPT)",
           lambda lower: "conversations" in lower or "conversation" in lower, _sharegpt_rows),
    Format("alpaca", "instruction, input (optional), output", _has("instruction", "output"), _alpaca_rows),
    Format("prompt-completion", "prompt + completion (or question/answer, statement/reply, ...)",
           _prompt_and_response, _prompt_completion_rows),
    Format("text", "one text column (continued pre-training: loss on every token)",
           lambda lower: True, _text_rows),
    Format("classification", "text + label (--task classify)", lambda lower: False, _classification_rows),
)}

# a column flag names the format it belongs to (today's flags keep working without --format)
FLAG_FORMAT = (("messages_column", "messages"), ("prompt_column", "prompt-completion"),
               ("response_column", "prompt-completion"), ("text_column", "text"))


def detect_format(columns, given: str | None = None, cols: dict | None = None) -> str:
    """The format name: ``given`` if set, else implied by a column flag, else from the columns."""
    if given is not None:
        if given not in FORMATS:
            raise DeltaError(f"unknown --format {given!r}; choose one of {sorted(FORMATS)}")
        return given
    lower = {str(c).lower(): c for c in columns}
    for flag, name in FLAG_FORMAT:
        if (cols or {}).get(flag):
            if name == "prompt-completion" and _has("instruction", "output", "input")(lower):
                return "alpaca"  # --prompt-column instruction on an alpaca file: keep its input
            return name
    return next(f.name for f in FORMATS.values() if f.detect(lower))


def load_records(path, fmt: str | None = None, split: str | None = None, config: str | None = None,
                 **cols) -> tuple[list[dict], list[int], str]:
    """(records, file line of each, format name) for a causal-LM data file / directory / dataset id."""
    path_str = str(path)
    df = read_table(path_str, split=split, config=config)
    p = Path(path_str)
    lines = _lines(df, p)
    name = detect_format(df.columns, fmt, cols)
    return FORMATS[name].rows(Table(df, p, lines), cols), lines, name


def as_record(row) -> dict:
    """Records from older callers: (prompt, response) pairs with prompt "" (text) or a message list."""
    if isinstance(row, dict):
        return row
    prompt, response = row
    if isinstance(prompt, list):
        return {"messages": list(prompt) + [{"role": "assistant", "content": response}]}
    if not prompt:
        return {"text": response}
    return _single_turn(prompt, response, f"{prompt}\n")
