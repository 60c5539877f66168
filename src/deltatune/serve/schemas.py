"""The request and response bodies of the native endpoints (``/v1/generate``, ``/v1/classify``,
``/v1/adapters``): field names, limits and defaults, each bad value a 422 naming the field.
The OpenAI-compatible bodies are in ``openai_schemas.py``."""
# no `from __future__ import annotations`: pydantic and FastAPI read these annotations at run time

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from .engine import MAX_TEMPERATURE, MIN_TEMPERATURE

StopStr = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str | None = Field(None, description="adapter name; null = the bare base model")
    prompt: str | None = Field(None, description="text prompt (needs the server's tokenizer)")
    input_ids: list[int] | None = Field(None, description="token ids instead of a prompt")
    max_new_tokens: int = Field(16, ge=1)
    num_beams: int = Field(1, ge=1, le=8, description="beam search (greedy only: temperature 0)")
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description=f"0 (default; in fact < {MIN_TEMPERATURE:g}) = greedy; "
                                           "more = sample from softmax(logits / temperature)")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                         description="nucleus sampling: keep the most likely tokens summing to top_p (1 = off)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="seed of this request's generator: same seed → same tokens; "
                                         "none = a fresh one, reported in the response")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, allow_inf_nan=False,
                                             description="> 1 discourages repeating prompt/output tokens "
                                                         "(CTRL); default: the model's, else 1")
    stop: list[StopStr] | None = Field(None, max_length=8, description="end the text before the first "
                                       "of these strings (at most 8; one string is a list of one)")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _no_do_sample(cls, data: Any) -> Any:
        if isinstance(data, dict) and "do_sample" in data:
            raise ValueError("there is no 'do_sample' field: 'temperature' > 0 samples, 0 (default) is greedy")
        return data

    @model_validator(mode="after")
    def _beams_are_greedy(self) -> "GenerateIn":
        if self.temperature >= MIN_TEMPERATURE and self.num_beams > 1:
            raise ValueError("'temperature' > 0 (sampling) needs 'num_beams' = 1")
        return self


class SettingsOut(BaseModel):
    decoding: str = Field(description="greedy | sample | beam")
    max_new_tokens: int
    num_beams: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None = Field(description="the generator's seed (sampling only): send it again to replay")
    repetition_penalty: float
    stop: list[str]


class GenerateOut(BaseModel):
    adapter: str | None
    text: str | None
    output_ids: list[int]
    finish_reason: str = Field(description="stop (EOS or a stop string) | length (max_new_tokens)")
    settings: SettingsOut = Field(description="the generation settings used")
    batch_size: int = Field(description="requests in the model call that served this one")


class ClassifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str | None = None
    text: str | None = None
    input_ids: list[int] | None = None


class ClassifyOut(BaseModel):
    adapter: str | None
    label: int
    label_name: str | None
    scores: list[float]
    batch_size: int


class LoadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Any = Field(description="a sub-directory of the server's adapter directory")


__all__ = ["ClassifyIn", "ClassifyOut", "GenerateIn", "GenerateOut", "LoadIn", "SettingsOut"]
