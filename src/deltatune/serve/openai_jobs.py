"""OpenAI request → engine jobs (``openai.py``'s endpoints): the cheap checks first (the server's
task, its tokenizer, unsupported fields, the ``model`` name), then the prompts tokenized off the
event loop and checked against the context, then one ``Job`` per prompt × ``n`` with its own
``Sampling`` (choice i sampled with seed + i).  Every refusal is a ``ParamError`` naming the
field, in OpenAI's vocabulary (``max_tokens``, not ``max_new_tokens``)."""

import secrets

from ..core.delta import get_state
from .engine import MIN_TEMPERATURE, Engine, Job, ParamError, RequestError, Sampling, validate_ids
from .openai_schemas import ChatIn, CompletionIn, unsupported


def about(e: RequestError, param: str) -> ParamError:
    """The engine's refusal as OpenAI words it: a 400 naming the field, for a prompt too long too."""
    message = e.message.replace("max_new_tokens", "max_tokens").replace("'input_ids'", "token ids")
    return ParamError(400, f"{param}: {message}", param, "context_length_exceeded" if e.status == 413 else None)


class OpenAIRequests:
    def __init__(self, model, tokenizer, engine: Engine, cfg, task: str, default_penalty: float):
        self.model, self.tokenizer, self.engine, self.cfg = model, tokenizer, engine, cfg  # cfg: OpenAIConfig
        self.task, self.default_penalty = task, default_penalty
        self.vocab = getattr(getattr(model, "config", None), "vocab_size", None)

    def adapter_of(self, name: str) -> str | None:
        """The adapter a ``model`` name means (None: the base model)."""
        if name == self.cfg.served_name:
            return None
        if name in get_state(self.model).adapters:
            return name
        raise ParamError(404, f"the model {name!r} does not exist: GET /v1/models lists the base "
                              f"({self.cfg.served_name!r}) and the loaded adapters", "model", "model_not_found")

    def accepted(self, body) -> str | None:
        """The checks that cost nothing, before any tokenizing: the server, the fields, the model."""
        if self.task != "generate":
            raise ParamError(400, "this server hosts a classifier: use /v1/classify")
        if self.tokenizer is None:
            raise ParamError(400, "the OpenAI endpoints need the server's tokenizer (to return text); this "
                                  "server has none: use /v1/generate with input_ids")
        unsupported(body)
        return self.adapter_of(body.model)

    # ------------------------------------------------------------------ prompts
    def checked(self, ids: list[int], param: str) -> list[int]:
        try:
            validate_ids(ids, self.vocab, self.engine.cfg.max_input_tokens)
        except RequestError as e:
            raise about(e, param)
        return ids

    async def encode(self, text: str, param: str, special: bool = True) -> list[int]:
        """Tokenized off the event loop, after the engine's character and Unicode checks."""
        try:
            return self.checked(await self.engine.tokenize(text, special), param)
        except ParamError:
            raise
        except RequestError as e:
            raise about(e, param)

    def check_n(self, prompts: int, n: int) -> None:  # before any tokenizing: the count alone can be refused
        if prompts * n > self.cfg.max_n:
            raise ParamError(400, f"this request asks for {prompts * n} choices (prompts × n); this server "
                                  f"gives at most {self.cfg.max_n} per request", "n")

    async def prompts_of(self, body: CompletionIn) -> list[list[int]]:
        """A completion's prompt(s): a string, strings, token ids or lists of token ids."""
        p = body.prompt
        self.check_n(1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p), body.n)
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            return [await self.encode(t, "prompt") for t in ([p] if isinstance(p, str) else p)]
        if not p:
            raise ParamError(400, "the prompt is empty", "prompt")
        lists = [p] if isinstance(p[0], int) else p
        return [self.checked(list(x), "prompt") for x in lists]

    async def chat_ids(self, body: ChatIn) -> list[int]:
        """The messages through the tokenizer's chat template, with the assistant's turn opened."""
        self.check_n(1, body.n)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ParamError(400, "this model's tokenizer has no chat template: use /v1/completions with a "
                                  "prompt you format yourself", "messages")
        msgs = [m.as_template_input() for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja's TemplateError (e.g. roles that must alternate), raised by the template
            raise ParamError(400, f"the model's chat template refused these messages: {e}", "messages")
        return await self.encode(text, "messages", special=False)

    # ------------------------------------------------------------------ jobs
    def new_tokens(self, adapter: str | None, prompts: list[list[int]], max_tokens: int | None,
                   default_max: int | None) -> int:
        """Tokens to generate.  ``default_max`` None: the server cap, or what the context leaves."""
        cap = self.engine.cfg.max_new_tokens
        if max_tokens is not None:
            new = max_tokens
        elif default_max is not None:
            new = min(default_max, cap)
        else:  # room left in the context after the longest prompt and the adapter's virtual tokens
            context = self.engine.context
            room = None if context is None else \
                context - max(map(len, prompts)) - self.engine.virtual_tokens(adapter)
            new = cap if room is None else max(1, min(cap, room))
        if new > cap:
            raise ParamError(400, f"max_tokens is at most {cap} on this server", "max_tokens")
        return new

    def sampling_of(self, body, i: int) -> Sampling:
        """Choice i's settings: greedy below MIN_TEMPERATURE, else sampled with seed + i."""
        stops = tuple([body.stop] if isinstance(body.stop, str) else body.stop or ())
        t = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        rp = body.repetition_penalty if body.repetition_penalty is not None else self.default_penalty
        if t < MIN_TEMPERATURE:
            return Sampling(repetition_penalty=rp, stop=stops)
        seed = (body.seed + i) % 2**63 if body.seed is not None else secrets.randbelow(2**53)
        return Sampling(t, body.top_p if body.top_p is not None else 1.0, body.top_k or 0, rp, seed, stops)

    def jobs_of(self, body, adapter: str | None, prompts: list[list[int]], max_tokens: int | None,
                default_max: int | None, logprobs: int | None, param: str) -> list[Job]:
        """One job per prompt × n."""
        new = self.new_tokens(adapter, prompts, max_tokens, default_max)
        jobs = []
        for ids in prompts:
            for i in range(body.n):
                jobs.append(Job("generate", adapter, ids, new, 1, self.sampling_of(body, i), logprobs=logprobs))
            try:  # the model's context: prompt + max_tokens (+ a prompt/prefix adapter's virtual tokens)
                self.engine.check_length(jobs[-1])
            except RequestError as e:
                raise about(e, param)
        return jobs


__all__ = ["OpenAIRequests", "about"]
