"""Metrics.track: one context manager records a request's outcome, latency, first token and tokens."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from budwood.serve.metrics import Metrics


@pytest.fixture
def metrics() -> Metrics:
    scheduler = SimpleNamespace(waiting=[], running=[], pool=SimpleNamespace(num_free=lambda: 7))
    engine = SimpleNamespace(scheduler=scheduler, adapters=SimpleNamespace(loaded={}))
    return Metrics(SimpleNamespace(engine=engine, in_flight=0))


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_block_that_finishes_is_ok_and_counts_its_tokens(metrics):
    with metrics.track("alpha", "chat") as track:
        track.tokens(5, 3)
    assert value(metrics, "budwood_requests_total", model="alpha", route="chat", status="ok") == 1
    assert value(metrics, "budwood_requests_total", model="alpha", route="chat", status="error") == 0
    assert value(metrics, "budwood_prompt_tokens_total", model="alpha") == 5
    assert value(metrics, "budwood_generation_tokens_total", model="alpha") == 3
    assert value(metrics, "budwood_request_latency_seconds_count", route="chat") == 1


@pytest.mark.parametrize("escaping", [ValueError("bad"), GeneratorExit()], ids=["error", "client-gone"])
def test_anything_escaping_the_block_is_an_error(metrics, escaping):
    with pytest.raises(type(escaping)), metrics.track("beta", "completions"):
        raise escaping
    assert value(metrics, "budwood_requests_total", model="beta", route="completions", status="error") == 1
    assert value(metrics, "budwood_requests_total", model="beta", route="completions", status="ok") == 0


def test_latency_runs_from_the_given_start_and_first_token_is_observed_once(metrics):
    started = time.perf_counter() - 2.0
    with metrics.track("alpha", "chat", started) as track:
        track.first_token()
        track.first_token()
    assert value(metrics, "budwood_time_to_first_token_seconds_count") == 1
    assert value(metrics, "budwood_time_to_first_token_seconds_sum") >= 2.0
    assert value(metrics, "budwood_request_latency_seconds_sum", route="chat") >= 2.0


def test_an_async_generator_closed_early_records_an_error(metrics):
    """A stream whose client went away is closed at its yield: that request did not finish ok."""
    async def chunks():
        with metrics.track("gamma", "chat"):
            yield 1
            yield 2

    async def read_one_then_close():
        gen = chunks()
        assert await anext(gen) == 1
        await gen.aclose()

    asyncio.run(read_one_then_close())
    assert value(metrics, "budwood_requests_total", model="gamma", route="chat", status="error") == 1
