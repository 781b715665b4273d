"""AsyncEngine's contract with a stand-in engine: streams, aborts, failures and the error kinds callers map."""
import asyncio
import threading
from types import SimpleNamespace

import pytest

from budwood.engine import (
    AdapterError,
    AsyncEngine,
    ChoiceDelta,
    EngineFailed,
    FinishReason,
    ParamError,
    QueueFull,
    RequestOutput,
    SamplingParams,
    UnknownAdapter,
)
from budwood.errors import ErrorKind, NotFoundError, Unavailable


class Countdown:
    """Each request emits its prompt's tokens one per step, then finishes; a prompt token 0 breaks the step, and
    a negative one is emitted at every step from then on (a request that only an abort ends)."""

    def __init__(self, max_queue: int = 8):
        self.config = SimpleNamespace(max_queue=max_queue)
        self.requests: dict[str, list[int]] = {}
        self.aborted: list[str] = []

    def add_request(self, prompt_ids, params, adapter, request_id, logprobs_from):
        if not prompt_ids:
            raise ParamError("prompt", "the prompt is empty")
        self.requests[request_id] = list(prompt_ids)

    def abort(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        outs = []
        for rid, left in list(self.requests.items()):
            token = left[0] if left[0] < 0 else left.pop(0)
            if token == 0:
                raise RuntimeError("boom")
            reason = None if left else FinishReason.LENGTH
            outs.append(RequestOutput(rid, [], [ChoiceDelta(0, str(token), [token], [], reason)], not left, 0, 1))
            if not left:
                del self.requests[rid]
        return outs


async def drain(engine: AsyncEngine, prompt: list[int]) -> list[int]:
    return [c.token_ids[0] async for out in engine.submit(prompt, SamplingParams(), None) for c in out.choices]


@pytest.fixture
def stand_in():
    inner = Countdown(max_queue=2)
    outer = AsyncEngine(inner)
    yield inner, outer
    outer.shutdown()
    assert not outer.thread.is_alive()


def test_requests_stream_to_the_end_side_by_side(stand_in):
    _, engine = stand_in

    async def main():
        return await asyncio.gather(drain(engine, [3, 2, 1]), drain(engine, [7, 8]))

    assert asyncio.run(main()) == [[3, 2, 1], [7, 8]]
    assert engine.in_flight == 0


def test_a_refused_request_raises_in_the_caller(stand_in):
    with pytest.raises(ParamError, match="empty"):
        asyncio.run(drain(stand_in[1], []))


def test_leaving_a_stream_early_aborts_its_request(stand_in):
    inner, engine = stand_in

    async def main():
        stream = engine.submit([1, 2, -1], SamplingParams(), None)  # endless: it cannot finish before the abort
        await anext(stream)
        await stream.aclose()
        for _ in range(3000):
            if inner.aborted:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert len(inner.aborted) == 1 and engine.in_flight == 0


def test_a_full_queue_is_unavailable(stand_in):
    _, engine = stand_in

    async def main():
        streams = [engine.submit([1, -1], SamplingParams(), None) for _ in range(2)]
        for s in streams:
            await anext(s)
        with pytest.raises(QueueFull, match="max_queue 2") as caught:
            await anext(engine.submit([1], SamplingParams(), None))
        for s in streams:
            await s.aclose()
        return caught.value

    error = asyncio.run(main())
    assert isinstance(error, Unavailable) and error.kind == ErrorKind.UNAVAILABLE


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(stand_in):
    _, engine = stand_in
    with pytest.raises(EngineFailed, match="boom"):
        asyncio.run(drain(engine, [5, 0]))
    assert asyncio.run(drain(engine, [4])) == [4]


def test_call_runs_on_the_engine_thread_and_raises_there_errors(stand_in):
    inner, engine = stand_in
    assert engine.call(lambda e, x: (e is inner, threading.current_thread().name, x), 9) == (True, "budwood-engine", 9)
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda e: 1 / 0)


def test_error_kinds_callers_map_to_statuses():
    assert UnknownAdapter("x").kind == ErrorKind.NOT_FOUND
    assert isinstance(UnknownAdapter("x"), AdapterError) and isinstance(UnknownAdapter("x"), NotFoundError)
    assert AdapterError("x").kind == ErrorKind.INVALID
    bad = ParamError("top_p", "top_p must be in (0, 1]")
    assert bad.kind == ErrorKind.INVALID and bad.param == "top_p" and str(bad) == "top_p must be in (0, 1]"
    assert QueueFull("busy").kind == ErrorKind.UNAVAILABLE
    assert EngineFailed("boom").kind == ErrorKind.INTERNAL  # a bug of ours: 500, not "try again"
