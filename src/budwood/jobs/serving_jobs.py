"""What /v1/fine_tuning/jobs does, without HTTP: a tenant's jobs created, listed, steered and followed.

A job request is checked in full before anything is written (the method, the model, the files and
their purpose), each refusal naming its parameter as OpenAI does; the queue checks the files again in
the transaction that creates the job. Another tenant's job is answered as one that does not exist.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

from budwood.errors import BudwoodError, NotFoundError
from budwood.jobs.protocol import FineTuningJob, FineTuningJobCheckpoint, FineTuningJobEvent, JobCreate, Page
from budwood.jobs.queue import request_hash
from budwood.jobs.service import Service
from budwood.jobs.states import QUIET, FilePurpose

DONE = "[DONE]"  # the last message of a live event stream, as OpenAI's streams end


class ServingFineTuning:
    """The fine-tuning jobs surface (held on `app.state.serving_jobs`); every method is scoped to one tenant."""

    def __init__(self, service: Service, poll_s: float = 0.5):
        self.queue, self.config = service.queue, service.config
        self.poll_s = poll_s

    def _check_file(self, tenant: str, file_id: str | None, param: str) -> None:
        if file_id is None:
            return
        try:
            row = self.queue.get_file(tenant, file_id, param)
        except NotFoundError:
            raise BudwoodError(f"invalid {param}: {file_id} does not exist", code=f"invalid_{param}",
                               param=param) from None
        if row.purpose != FilePurpose.FINE_TUNE:
            raise BudwoodError(f"invalid {param}: {file_id} has purpose {row.purpose!r}; upload it with purpose "
                               f"'{FilePurpose.FINE_TUNE}'", code=f"invalid_{param}", param=param)

    def job_values(self, tenant: str, body: JobCreate) -> dict:
        """The new job's columns, once every part of the request has been checked."""
        if body.method is not None and body.method.type != "supervised":
            raise BudwoodError(f"method.type {body.method.type!r} is not supported here; this service runs "
                               "supervised (LoRA) fine-tuning", code="unsupported_method", param="method.type")
        if body.method is not None and body.hyperparameters is not None and body.method.supervised is not None \
                and body.hyperparameters != body.method.supervised.hyperparameters:
            raise BudwoodError("hyperparameters and method.supervised.hyperparameters disagree; give them once, "
                               "under method", code="invalid_value", param="hyperparameters")
        if body.integrations:
            raise BudwoodError("integrations are not supported by this service (it reaches no outside service); "
                               "follow training through /events or the dashboard", code="unsupported_parameter",
                               param="integrations")
        if body.model != self.config.serving.base:
            raise BudwoodError(f"Model {body.model!r} is not available for fine-tuning here; this service "
                               f"fine-tunes {self.config.serving.base!r}", code="model_not_available", param="model")
        self._check_file(tenant, body.training_file, "training_file")
        self._check_file(tenant, body.validation_file, "validation_file")
        return {"model": body.model, "training_file": body.training_file, "validation_file": body.validation_file,
                "suffix": body.suffix, "seed": body.seed if body.seed is not None else secrets.randbelow(2**31),
                "meta": body.metadata, "hyperparameters": body.requested_hyperparameters().model_dump()}

    async def create(self, tenant: str, body: JobCreate, idempotency_key: str | None) -> FineTuningJob:
        """A new job in validating_files, or the one this idempotency key made before."""
        values = await asyncio.to_thread(self.job_values, tenant, body)
        job, _ = await asyncio.to_thread(self.queue.create_job, tenant, values, idempotency_key,
                                         request_hash(body.model_dump(mode="json")))
        return FineTuningJob.of(job)

    async def list(self, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None
                   ) -> Page[FineTuningJob]:
        rows, more = await asyncio.to_thread(self.queue.list_jobs, tenant, after, limit, metadata)
        return Page[FineTuningJob].of([FineTuningJob.of(j) for j in rows], more)

    async def retrieve(self, tenant: str, job_id: str) -> FineTuningJob:
        return FineTuningJob.of(await asyncio.to_thread(self.queue.get_job, tenant, job_id))

    async def cancel(self, tenant: str, job_id: str) -> FineTuningJob:
        return FineTuningJob.of(await asyncio.to_thread(self.queue.cancel, tenant, job_id))

    async def pause(self, tenant: str, job_id: str) -> FineTuningJob:
        return FineTuningJob.of(await asyncio.to_thread(self.queue.pause, tenant, job_id))

    async def resume(self, tenant: str, job_id: str) -> FineTuningJob:
        return FineTuningJob.of(await asyncio.to_thread(self.queue.resume, tenant, job_id))

    async def events(self, tenant: str, job_id: str, after: str | None, limit: int) -> Page[FineTuningJobEvent]:
        """Newest first, as OpenAI lists them."""
        rows, more = await asyncio.to_thread(self.queue.events, tenant, job_id, after, limit)
        return Page[FineTuningJobEvent].of([FineTuningJobEvent.of(e) for e in rows], more)

    async def checkpoints(self, tenant: str, job_id: str, after: str | None, limit: int
                          ) -> Page[FineTuningJobCheckpoint]:
        job = await asyncio.to_thread(self.queue.get_job, tenant, job_id)
        rows, more = await asyncio.to_thread(self.queue.checkpoints, tenant, job_id, after, limit)
        return Page[FineTuningJobCheckpoint].of([FineTuningJobCheckpoint.of(c, job) for c in rows], more)

    async def live_events(self, tenant: str, job_id: str) -> AsyncIterator[str]:
        """The job's events as JSON, oldest first, as they are written, then DONE once the job has ended
        or paused. Looks the job up first, so that an unknown job is refused before a stream starts."""
        await asyncio.to_thread(self.queue.get_job, tenant, job_id)
        return self._follow(tenant, job_id)

    async def _follow(self, tenant: str, job_id: str) -> AsyncIterator[str]:
        last = 0
        while True:
            rows, _ = await asyncio.to_thread(self.queue.events, tenant, job_id, None, 0, last)
            for e in rows:
                last = e.seq
                yield json.dumps(FineTuningJobEvent.of(e).model_dump(mode="json"), separators=(",", ":"))
            if rows:
                continue
            job = await asyncio.to_thread(self.queue.get_job, tenant, job_id)
            if job.status in QUIET:
                rows, _ = await asyncio.to_thread(self.queue.events, tenant, job_id, None, 0, last)
                for e in rows:
                    yield json.dumps(FineTuningJobEvent.of(e).model_dump(mode="json"), separators=(",", ":"))
                yield DONE
                return
            await asyncio.sleep(self.poll_s)
