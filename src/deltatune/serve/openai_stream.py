"""Engine jobs → OpenAI responses (``openai.py``'s endpoints): token usage, logprobs in OpenAI's
shape, and ``stream: true`` as Server-Sent Events, one chunk per decoded token of any choice
(``stream.TextStream`` holds back text that may still become a stop string), each choice's
final chunk, the usage chunk if asked, then ``data: [DONE]``."""

import asyncio
import json

from .engine import Engine, Job
from .stream import TextStream


class Logprobs:
    """One choice's logprobs in OpenAI's shape, from the engine's trace ((logprob, [(token, logprob)])
    per generated token), taken in pieces as a stream goes on (``offset``: where the next token's
    text starts, for completions' ``text_offset``)."""

    def __init__(self, tokenizer, chat: bool, k: int):
        self.tokenizer, self.chat, self.k, self.offset = tokenizer, chat, k, 0

    def take(self, ids: list[int], entries: list) -> dict | None:
        if not ids:
            return None
        piece = [self.tokenizer.decode([t]) for t in ids]
        alts = [[(self.tokenizer.decode([a]), v) for a, v in e[1]] for e in entries]
        if self.chat:
            return {"content": [{"token": p, "logprob": e[0], "bytes": list(p.encode()),
                                 "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())}
                                                  for a, v in alt]}
                                for p, e, alt in zip(piece, entries, alts)]}
        offsets = []
        for p in piece:
            offsets.append(self.offset)
            self.offset += len(p)
        return {"tokens": piece, "token_logprobs": [e[0] for e in entries],
                "top_logprobs": [dict(alt) for alt in alts] if self.k else None, "text_offset": offsets}


def logprobs_of(tokenizer, job: Job, chat: bool) -> dict | None:
    if job.logprobs is None:
        return None
    return Logprobs(tokenizer, chat, job.logprobs).take(job.result["output_ids"], job.result["logprobs"])


def usage(prompts: list[list[int]], jobs: list[Job]) -> dict:
    p, c = sum(map(len, prompts)), sum(len(j.result["output_ids"]) for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def stream(engine: Engine, tokenizer, jobs: list[Job], prompts: list[list[int]], head: dict, chat: bool,
           include_usage: bool):
    """SSE: a chunk per token of any choice as the engine decodes it, then each choice's final one."""
    from fastapi.responses import StreamingResponse

    events: asyncio.Queue = asyncio.Queue()
    for i, j in enumerate(jobs):
        j.on_token_loop = lambda tok, i=i: events.put_nowait((i, tok))  # (the engine sends a step's tokens at once)
    futures = engine.enqueue(jobs)  # a full queue is a 429 before any byte is sent
    for i, f in enumerate(futures):
        f.add_done_callback(lambda f, i=i: events.put_nowait((i, None)))
    texts = [TextStream(lambda t: tokenizer.decode(t, skip_special_tokens=True), j.sampling.stop) for j in jobs]
    lps = [Logprobs(tokenizer, chat, j.logprobs) if j.logprobs is not None else None for j in jobs]
    given = [0] * len(jobs)  # tokens whose logprobs were sent, per choice

    def chunk(i: int, text: str | None = None, reason: str | None = None, role: bool = False,
              upto: list[int] | None = None) -> str:
        lp = None
        if lps[i] is not None and not role:  # the logprobs of the tokens received since the last chunk
            ids = texts[i].toks if upto is None else upto
            lp, given[i] = lps[i].take(ids[given[i]:], jobs[i].trace[given[i]:len(ids)]), len(ids)
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    async def events_out():
        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, role=True)
            for _ in range(len(jobs)):
                while True:
                    i, tok = await events.get()
                    if tok is not None:
                        if delta := texts[i].push(tok):
                            yield chunk(i, delta)
                        continue
                    f = futures[i]
                    if f.exception() is not None:  # after the headers: an error event, as OpenAI does
                        e = f.exception()
                        err = {"message": getattr(e, "message", str(e)), "type": "server_error", "param": None,
                               "code": getattr(e, "status", 500)}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                    else:
                        r = f.result().result
                        yield chunk(i, texts[i].finish(r["text"]) or None, r["finish_reason"], upto=r["output_ids"])
                    break
            if include_usage and all(f.exception() is None for f in futures):
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompts, jobs)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a client that went away: its rows end at the next decoding step, queued ones never run
            for j, f in zip(jobs, futures):
                j.cancelled = True
                f.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no asyncio warning

    return StreamingResponse(events_out(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["Logprobs", "logprobs_of", "stream", "usage"]
