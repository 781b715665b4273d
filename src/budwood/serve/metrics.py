"""Prometheus metrics for the server: requests, tokens, latencies, queue depth, per model.

Every route that generates records its request through `Metrics.track`, one context manager for its
latency, outcome ("ok", or "error" when anything escapes it, a client going away included) and the
tokens it used, all under the model label. Routes enter it only once the model name is known to the
server, so callers cannot invent labels.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class RequestTrack:
    """What a route reports while its request runs; `Metrics.track` records the outcome."""

    metrics: Metrics
    model: str
    started: float
    first_token_seen: bool = field(default=False, init=False)

    def first_token(self) -> None:
        """A streamed token went out: the first call observes the time to first token."""
        if not self.first_token_seen:
            self.first_token_seen = True
            self.metrics.first_token.observe(time.perf_counter() - self.started)

    def tokens(self, prompt: int, generated: int) -> None:
        self.metrics.tokens(self.model, prompt, generated)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("budwood_requests", "Finished requests by model (adapter), route and outcome",
                                ["model", "route", "status"], registry=r)
        self.prompt_tokens = Counter("budwood_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("budwood_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.latency = Histogram("budwood_request_latency_seconds", "Request latency", ["route"],
                                 buckets=_LATENCY, registry=r)
        self.first_token = Histogram("budwood_time_to_first_token_seconds", "Time to first streamed token",
                                     buckets=_LATENCY, registry=r)
        self.step = Histogram("budwood_engine_step_seconds", "Engine step duration",
                              buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        sched = engine.engine.scheduler
        Gauge("budwood_requests_waiting", "Sequences waiting for admission", registry=r).set_function(
            lambda: len(sched.waiting))
        Gauge("budwood_requests_running", "Sequences being computed", registry=r).set_function(
            lambda: len(sched.running))
        Gauge("budwood_requests_in_flight", "Requests accepted and not finished", registry=r).set_function(
            lambda: engine.in_flight)
        Gauge("budwood_kv_cache_free_blocks", "Free KV-cache blocks", registry=r).set_function(
            sched.pool.num_free)
        Gauge("budwood_adapters_loaded", "Adapters in memory", registry=r).set_function(
            lambda: len(engine.engine.adapters.loaded))

    def observe_step(self, seconds: float) -> None:
        self.step.observe(seconds)

    @contextmanager
    def track(self, model: str, route: str, started: float | None = None) -> Iterator[RequestTrack]:
        """Time the block as one request of `route` on `model`, from `started` (perf_counter) if given."""
        track = RequestTrack(self, model, time.perf_counter() if started is None else started)
        status = "error"
        try:
            yield track
            status = "ok"
        finally:
            self.request(model, route, status, time.perf_counter() - track.started)

    def request(self, model: str, route: str, status: str, seconds: float) -> None:
        self.requests.labels(model, route, status).inc()
        self.latency.labels(route).observe(seconds)

    def tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generation_tokens.labels(model).inc(generated)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
