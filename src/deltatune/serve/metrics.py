"""Prometheus metrics of ``deltatune serve`` (``GET /metrics``): requests, latency and errors per
endpoint (counted by ``middleware.add_measure``), and what the engine reports as it batches and
decodes (``stream.EngineEvents``): batch sizes, rows per adapter and decoding mode, tokens,
time to first token and between tokens."""

from .engine import Job
from .stream import EngineEvents


def _label(job: Job) -> str:
    return job.adapter or "(base)"


class Metrics(EngineEvents):
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("deltatune_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("deltatune_request_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("deltatune_batch_size", "requests per model call", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.adapters = Counter("deltatune_adapter_requests_total", "rows served per adapter", ["adapter"], registry=r)
        self.errors = Counter("deltatune_errors_total", "failed requests", ["endpoint", "status"], registry=r)
        self.loaded = Gauge("deltatune_adapters_loaded", "adapters loaded", registry=r)
        self.queue = Gauge("deltatune_queue_depth", "requests waiting", registry=r)
        self.decoding = Counter("deltatune_generate_rows_total", "generated rows per decoding mode",
                                ["decoding"], registry=r)
        self.prompt_tokens = Counter("deltatune_prompt_tokens_total", "prompt tokens per adapter", ["adapter"],
                                     registry=r)
        self.generated_tokens = Counter("deltatune_generated_tokens_total", "tokens generated per adapter "
                                        "(after cutting at EOS / stop strings)", ["adapter"], registry=r)
        seconds = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("deltatune_time_to_first_token_seconds", "arrival to first generated token "
                              "(queueing + prefill)", ["adapter"], registry=r, buckets=seconds)
        self.itl = Histogram("deltatune_inter_token_seconds", "time between a request's successive tokens",
                             ["adapter"], registry=r, buckets=(.001, .0025) + seconds[:-2])
        self.running = Gauge("deltatune_running_rows", "rows still decoding in the current model call", registry=r)

    def on_batch(self, jobs: list[Job]) -> None:
        self.batch.observe(len(jobs))
        for j in jobs:
            self.adapters.labels(_label(j)).inc()
            self.prompt_tokens.labels(_label(j)).inc(len(j.ids))
            if j.kind == "generate":
                self.decoding.labels("beam" if j.num_beams > 1 else j.sampling.decoding).inc()

    def on_token(self, job: Job, first: bool, gap: float) -> None:
        (self.ttft if first else self.itl).labels(_label(job)).observe(gap)

    def on_running(self, rows: int) -> None:
        self.running.set(rows)

    def on_done(self, job: Job) -> None:
        if job.kind == "generate":
            self.generated_tokens.labels(_label(job)).inc(len(job.result["output_ids"]))


__all__ = ["Metrics"]
