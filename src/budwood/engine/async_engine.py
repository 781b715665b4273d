"""`AsyncEngine`: the engine on a thread of its own, streaming to asyncio callers (the server).

Only the engine thread touches the Engine's scheduler and model. Callers send it typed commands
(`AddRequest`, `AbortRequest`, `CallOnEngine`, `Shutdown`), which it carries out between steps in the
order sent; each request's outputs come back through its own asyncio queue. A failed step fails the
requests it held, never the thread, so one bad request cannot stop the server.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from budwood.engine.adapters import LoadedAdapter
from budwood.engine.engine import Engine
from budwood.engine.output import RequestOutput
from budwood.engine.sampling import SamplingParams
from budwood.errors import BudwoodError, ErrorKind, Unavailable

log = logging.getLogger(__name__)


class QueueFull(Unavailable):
    """More requests in flight than `EngineConfig.max_queue`: the caller should retry later."""


class EngineFailed(BudwoodError):
    """A step raised (a bug): every request in the engine is failed with this and dropped."""

    kind = ErrorKind.INTERNAL


@dataclass(frozen=True)
class AddRequest:
    """Start a request; its outputs go to the stream registered under `request_id`."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoadedAdapter | None
    logprobs_from: int = 1


@dataclass(frozen=True)
class AbortRequest:
    """Drop a request whose caller went away (a no-op once it has finished)."""

    request_id: str


@dataclass(frozen=True)
class CallOnEngine:
    """Run `fn(engine, *args)` between two steps; its result or exception goes to `future`."""

    fn: Callable[..., Any]
    args: tuple
    future: Future


@dataclass(frozen=True)
class Shutdown:
    """Stop the engine thread after the commands sent before this one."""


EngineCommand = AddRequest | AbortRequest | CallOnEngine | Shutdown


@dataclass(frozen=True)
class _Stream:
    """Where one request's outputs (or the exception that ended it) are delivered."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """Runs the engine's steps on one thread; asyncio callers submit requests and stream outputs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.on_step: Callable[[float], None] | None = None  # called with each step's seconds (metrics)
        self._commands: list[EngineCommand] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self.thread = threading.Thread(target=self._loop, name="budwood-engine", daemon=True)
        self.thread.start()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished or abandoned."""
        return len(self._streams)

    async def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: LoadedAdapter | None,
                     logprobs_from: int = 1) -> AsyncIterator[RequestOutput]:
        """Yields outputs until the request finishes; leaving early (a client that went away) aborts it.

        Raises QueueFull when `max_queue` requests are in flight, and whatever `Engine.add_request`
        raises (a ParamError for a request that cannot fit) at the first iteration."""
        max_queue = self.engine.config.max_queue
        if len(self._streams) >= max_queue:
            raise QueueFull(f"the server is busy: {len(self._streams)} requests in flight (max_queue "
                            f"{max_queue}); retry later")
        request_id = uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._send(AddRequest(request_id, list(prompt_ids), params, adapter, logprobs_from))
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(AbortRequest(request_id))

    def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run fn(engine, *args) on the engine thread (for adapter loads that must not race a step)."""
        future: Future = Future()
        self._send(CallOnEngine(fn, args, future))
        return future.result()

    def shutdown(self) -> None:
        """Stop the engine thread (within 5 s: after the step under way and the commands sent before)."""
        self._send(Shutdown())
        self.thread.join(timeout=5)

    def _send(self, command: EngineCommand) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _loop(self) -> None:
        while self._run_commands():
            if self.engine.has_unfinished():
                self._step()
            else:
                self._wake.wait(0.5)
                self._wake.clear()

    def _run_commands(self) -> bool:
        """Carry out the commands sent since the last step, in order; False once told to shut down."""
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            match command:
                case AddRequest():
                    try:
                        self.engine.add_request(command.prompt_ids, command.params, command.adapter,
                                                request_id=command.request_id, logprobs_from=command.logprobs_from)
                    except Exception as e:  # reported to the caller, never fatal to the loop
                        self._deliver(command.request_id, e)
                case AbortRequest():
                    self.engine.abort(command.request_id)
                case CallOnEngine():
                    try:
                        command.future.set_result(command.fn(self.engine, *command.args))
                    except Exception as e:
                        command.future.set_exception(e)
                case Shutdown():
                    return False
        return True

    def _step(self) -> None:
        t = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug in a step must not leave callers hanging
            log.exception("engine step failed")
            for request_id in list(self.engine.requests):
                self._deliver(request_id, EngineFailed(f"internal engine error: {e}"))
                self.engine.abort(request_id)
            return
        if self.on_step is not None:
            self.on_step(time.perf_counter() - t)
        for out in outputs:
            self._deliver(out.request_id, out)
