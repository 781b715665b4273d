"""A running job's line to the queue: its lease renewed, its progress and events written, and the
user's cancel or pause brought back to the training loop as a `StopReason` (budwood.train.state).

The heartbeat runs on its own thread every `heartbeat_s`, so a long step never lets the lease run out;
events are buffered and written in order (one flush at a time), and a checkpoint or an outcome flushes
first, so that the job's story is complete before it moves on. A database that is away for a moment is
tried again until the lease must be gone; then the job is given up as lost (another worker has it).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from budwood.jobs.queue import Lease, LeaseLost
from budwood.jobs.service import Service
from budwood.jobs.states import EventLevel, EventType, JobStatus
from budwood.train.state import StopReason

log = logging.getLogger(__name__)
ACCURACY = "mean_token_accuracy"  # OpenAI's name for the step statistic, as the recipe logs it


class Heartbeat:
    """Renews the lease every heartbeat_s on its own thread, carrying progress and buffered events; its
    `reason` is set when training must stop."""

    def __init__(self, service: Service, lease: Lease, shutdown: threading.Event):
        self.service, self.lease, self.shutdown = service, lease, shutdown
        self.config = service.config
        self.reason: StopReason | None = None
        self.progress: dict | None = None
        self.estimated_finish: float | None = None
        self.events: list[tuple] = []
        self.lock = threading.Lock()
        self.flushing = threading.Lock()  # one flush at a time, so events keep their order
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True)
        self.last_ok = time.monotonic()
        # what makes a message fit for the tenant (JobRun's: no path of the worker's or the service's folders);
        # every event passes through it, whoever wrote it (the recipe's notes name checkpoint folders)
        self.public: Callable[[str], str] = lambda message: message

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=self.config.lease_s)

    def emit(self, message: str, level: EventLevel = EventLevel.INFO, type_: EventType = EventType.MESSAGE,
             data: dict | None = None) -> None:
        message = self.public(message)
        if data:
            data = {k: self.public(v) if isinstance(v, str) else v for k, v in data.items()}
        with self.lock:
            self.events.append((level, type_, message, data))

    def flush(self) -> None:
        """Events and progress to the database now (checkpoints and outcomes call this first)."""
        with self.flushing:
            self._flush()

    def _flush(self) -> None:
        with self.lock:
            events, self.events = self.events, []
            progress, eta = self.progress, self.estimated_finish
        try:
            self.service.queue.emit(self.lease, events)
        except Exception:
            with self.lock:
                self.events[:0] = events  # kept for the next try
            raise
        status = self.service.queue.heartbeat(self.lease, self.config.lease_s, progress, eta)
        self.last_ok = time.monotonic()
        if status == JobStatus.CANCELLED and not self.reason:
            self.reason = StopReason.CANCELLED
        elif status == JobStatus.PAUSING and not self.reason:
            self.reason = StopReason.PAUSED

    def _run(self) -> None:
        while not self.done.wait(self.config.heartbeat_s):
            if self.shutdown.is_set() and not self.reason:
                self.reason = StopReason.SHUTDOWN
            try:
                self.flush()
            except LeaseLost:
                self.reason = StopReason.LEASE_LOST
                return
            except Exception as e:  # the database away for a moment: try again, until the lease must be gone
                log.warning("heartbeat of %s failed: %s", self.lease.job_id, e)
                if time.monotonic() - self.last_ok > self.config.lease_s:
                    self.reason = StopReason.LEASE_LOST
                    return


class JobProgress:
    """budwood.train.recipe.Progress for a job: per-step metrics events and the estimated finish."""

    def __init__(self, beat: Heartbeat):
        self.beat = beat
        self.started = time.time()
        self.first_step = 0
        self.total = 0
        self.valid_loss: float | None = None
        self.train_loss: float | None = None

    def start(self, total_steps: int, first_step: int) -> None:
        self.total, self.first_step, self.started = total_steps, first_step, time.time()

    def update(self, record: dict) -> None:
        step = record["step"]
        if "val_loss" in record:
            self.valid_loss = record["val_loss"]
            self.beat.emit(f"Step {step}/{self.total}: validation loss={record['val_loss']:.4f}",
                           type_=EventType.METRICS,
                           data={"step": step, "train_loss": self.train_loss, "valid_loss": record["val_loss"],
                                 "total_steps": self.total})
            with self.beat.lock:
                if self.beat.progress is not None:
                    self.beat.progress = dict(self.beat.progress, valid_loss=self.valid_loss)
            return
        self.train_loss = record["loss"]
        data = {"step": step, "train_loss": record["loss"], "total_steps": self.total,
                "tokens_per_s": record.get("tokens_per_s"), "learning_rate": record.get("lr")}
        if ACCURACY in record:  # the share of answer tokens the model predicted, where the recipe measures it
            data[ACCURACY] = record[ACCURACY]
        self.beat.emit(f"Step {step}/{self.total}: training loss={record['loss']:.4f}", type_=EventType.METRICS,
                       data=data)
        done = step - self.first_step
        rate = (time.time() - self.started) / done if done > 0 else None
        with self.beat.lock:
            self.beat.progress = {"step": step, "total_steps": self.total, "train_loss": record["loss"],
                                  "valid_loss": self.valid_loss, "tokens_per_s": record.get("tokens_per_s")}
            self.beat.estimated_finish = time.time() + rate * (self.total - step) if rate else None

    def note(self, message: str) -> None:
        self.beat.emit(message, EventLevel.WARN if message.startswith("warning") else EventLevel.INFO)

    def stop(self) -> None:
        pass


class JobEvalProgress:
    """budwood.eval.context.Progress for a job: the evaluation reported in the job's events, which are
    written (and fenced by the lease) with the heartbeat's, as training's are.

    Each part of a suite announces its start; a part that takes a while reports each further tenth done, at
    most one event per `min_gap_s`, and at least one every `every_s` while it runs. Quick parts (most, on
    small data) so cost one event each, and a slow machine still shows that the job is alive."""

    every_s = 30.0
    min_gap_s = 5.0

    def __init__(self, beat: Heartbeat, clock=time.monotonic):
        self.beat, self.clock = beat, clock
        self.side = "adapted"
        self.label, self.total, self.done, self.tenth = "", 0, 0, 0
        self.last = clock()

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.tenth = label, total, 0, 0
        self._emit(f"Evaluating the {self._side()}: {label} ({total:,})")

    def advance(self, n: int) -> None:
        self.done += n
        tenth = 10 * self.done // max(self.total, 1)
        waited = self.clock() - self.last
        if waited >= self.every_s or (tenth > self.tenth and waited >= self.min_gap_s):
            self.tenth = tenth
            self._emit(f"Evaluating the {self._side()}: {self.label}: {self.done:,} of {self.total:,}")

    def stop(self) -> None:
        pass

    def _side(self) -> str:
        return {"adapted": "adapter", "base": "base model"}.get(self.side, self.side)

    def _emit(self, message: str) -> None:
        self.last = self.clock()
        self.beat.emit(message, data={"evaluation": {"side": self.side, "part": self.label, "done": self.done,
                                                     "total": self.total}})
