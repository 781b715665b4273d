"""The words the service's rows are in: a job's status, a file's purpose and status, an event's level and
type. Each is a StrEnum, so a row read back from the database (a plain string) compares equal to its
member, and no other module spells a status out. (Why a worker stops training early is the recipe's
`budwood.train.state.StopReason`, which the training loop itself reports.)

A job moves validating_files -> queued -> running -> succeeded | failed | cancelled (OpenAI's statuses),
plus budwood's pause: running -> pausing (the worker is saving a checkpoint) -> paused -> queued again.
"""
from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


# waiting for a worker: a claim takes the oldest of these whose lease is free
WAITING = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED})
# a worker may hold the lease in these (every write of its is fenced on them)
HELD = WAITING | {JobStatus.RUNNING, JobStatus.PAUSING}
# count against a tenant's concurrent jobs: the same statuses, for another reason (a paused job does not)
ACTIVE = HELD
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# not finished: the job may still train, so its files must stay
UNFINISHED = ACTIVE | {JobStatus.PAUSED}
# a live event stream ends at these: nothing more happens until someone resumes it
QUIET = TERMINAL | {JobStatus.PAUSED}


class FilePurpose(StrEnum):
    FINE_TUNE = "fine-tune"  # what tenants upload; counts against their storage quota
    RESULTS = "fine-tune-results"  # what a job writes (its metrics CSV); does not count


class FileStatus(StrEnum):
    PROCESSED = "processed"  # uploads are checked before they are stored, so every stored file is


class EventLevel(StrEnum):
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class EventType(StrEnum):
    MESSAGE = "message"
    METRICS = "metrics"  # data: step, train_loss and/or valid_loss, total_steps, ...
