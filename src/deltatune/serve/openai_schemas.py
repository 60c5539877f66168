"""The request bodies of the OpenAI-compatible endpoints (``serve_openai``): OpenAI's field names,
types and defaults, the limits a bad value breaks (each a 400 naming the field), and the fields
deltatune does not support, refused by name instead of silently ignored."""
# no `from __future__ import annotations`: pydantic and FastAPI read these annotations at run time

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .engine import MAX_TEMPERATURE, ParamError

StopStr = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="a last chunk with the request's token counts")


class SamplingIn(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")
    model: Name = Field(description="an adapter's name, or the base model's (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (server cap: --max-new-tokens)")
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                      description="default 1 (OpenAI's); < 1e-5 = greedy")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling (1 = off)")
    n: int = Field(1, ge=1, description="choices per prompt (choice i samples with seed + i)")
    stream: bool = Field(False, description="Server-Sent Events, a chunk per token, then 'data: [DONE]'")
    stream_options: StreamOptions | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=8)] | None = Field(
        None, description="end the text before the first of these strings (at most 8)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed → same tokens, whatever the batch")
    presence_penalty: float = Field(0.0, allow_inf_nan=False, description="only 0 (use repetition_penalty)")
    frequency_penalty: float = Field(0.0, allow_inf_nan=False, description="only 0 (use repetition_penalty)")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (only empty)")
    user: str | None = Field(None, description="accepted and ignored")
    top_k: int | None = Field(None, ge=0, description="extension (vLLM's): keep the k most likely tokens, 0 = off")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, allow_inf_nan=False,
                                             description="extension (vLLM's): > 1 discourages repeats (CTRL)")


class CompletionIn(SamplingIn):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, token ids, or a list of token-id lists")
    logprobs: int | None = Field(None, ge=0, le=5, description="each token's log-probability and this many "
                                                               "most likely alternatives")
    echo: bool = Field(False, description="not supported")
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="only 1")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only text parts (no images or audio)")
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        return {"role": self.role, "content": text, **({"name": self.name} if self.name else {})}


class ChatIn(SamplingIn):
    messages: list[Message] = Field(min_length=1, description="rendered by the tokenizer's chat template")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = Field(None, description="each token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and this many most likely alternatives")
    tools: list[Any] | None = Field(None, description="not supported")
    tool_choice: Any = Field(None, description="not supported")
    response_format: Any = Field(None, description="only text")
    parallel_tool_calls: bool | None = None


class LoadLoraIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Name = Field(description="the adapter's name: a sub-directory of the server's adapter directory")
    lora_path: str | None = Field(None, description="must be that sub-directory (absolute, or relative to it)")


class UnloadLoraIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Name


# field -> (is the value unsupported?, what to do instead)
UNSUPPORTED = {
    "echo": (lambda v: v is True, ": prepend the prompt yourself (there are no prompt logprobs)"),
    "suffix": (lambda v: v is not None, ""),
    "best_of": (lambda v: v not in (None, 1), ": use n"),
    "presence_penalty": (lambda v: v != 0, ": use repetition_penalty"),
    "frequency_penalty": (lambda v: v != 0, ": use repetition_penalty"),
    "logit_bias": (lambda v: bool(v), ""),
    "tools": (lambda v: bool(v), ""),
    "tool_choice": (lambda v: v not in (None, "none"), ""),
    "response_format": (lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"), ""),
}


def unsupported(body: BaseModel) -> None:
    """A 400 naming the first field set to something deltatune does not do."""
    for name, (bad, hint) in UNSUPPORTED.items():
        if name in type(body).model_fields and bad(getattr(body, name)):
            raise ParamError(400, f"{name!r} = {getattr(body, name)!r} is not supported by deltatune serve{hint}",
                             name, "unsupported_parameter")
