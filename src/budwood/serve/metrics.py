"""Prometheus metrics for the server: requests, tokens, latencies, queue depth, per model."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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

    def request(self, model: str, route: str, status: str, seconds: float) -> None:
        self.requests.labels(model, route, status).inc()
        self.latency.labels(route).observe(seconds)

    def tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generation_tokens.labels(model).inc(generated)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
