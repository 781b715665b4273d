"""What /v1/fine_tuning/jobs does, without HTTP: a tenant's jobs created, listed, steered and followed.

A job request is checked in full before anything is written (the method, the model, the files and
their purpose; the integrations' shape in protocol.py), each refusal naming its parameter as OpenAI does;
the queue checks the files again in the transaction that creates the job. Another tenant's job is
answered as one that does not exist.
"""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

from budwood.data.formats import PREFERENCE_FORMATS
from budwood.errors import BudwoodError
from budwood.jobs.models import StoredFile
from budwood.jobs.protocol import (
    CheckpointPermissionDeleted,
    CheckpointPermissionObject,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobCreate,
    ModelDeleted,
    Page,
    split_model,
)
from budwood.jobs.queue import request_hash
from budwood.jobs.service import Service
from budwood.jobs.states import QUIET

METHODS = {"supervised": "sft", "dpo": "preference"}  # the methods run here, and the data kind each trains on


def check_method(body: JobCreate) -> None:
    """Supervised or DPO, each with its hyperparameters given once, where OpenAI's API takes them."""
    method = body.method
    if method is None:
        return
    if method.type not in METHODS:
        raise BudwoodError(f"method.type {method.type!r} is not supported here; this service runs "
                           f"{' and '.join(METHODS)} (LoRA) fine-tuning", code="unsupported_method",
                           param="method.type")
    for other in ("supervised", "dpo", "reinforcement"):
        if other != method.type and getattr(method, other) is not None:
            raise BudwoodError(f"method.{other} is given but method.type is {method.type!r}; give the "
                               f"hyperparameters under method.{method.type}", code="invalid_value",
                               param=f"method.{other}")
    if body.hyperparameters is None:
        return
    if method.type == "dpo":
        raise BudwoodError("hyperparameters (deprecated by OpenAI) are for supervised jobs; give a DPO job's under "
                           "method.dpo.hyperparameters", code="invalid_value", param="hyperparameters")
    if method.supervised is not None and body.hyperparameters != method.supervised.hyperparameters:
        raise BudwoodError("hyperparameters and method.supervised.hyperparameters disagree; give them once, "
                           "under method", code="invalid_value", param="hyperparameters")


def check_kind(file: StoredFile | None, method: str, param: str) -> None:
    """A preference file trains only a DPO job, chat examples only a supervised one: refused when the job is
    created, naming the file, rather than when a worker reads it."""
    if file is None:
        return
    kind = "preference" if file.format in PREFERENCE_FORMATS else "sft"
    if kind != METHODS[method]:
        holds = "preference pairs" if kind == "preference" else "chat examples for supervised fine-tuning"
        wants = "preference pairs ({\"input\", \"preferred_output\", \"non_preferred_output\"} or TRL's " \
                "prompt/chosen/rejected)" if method == "dpo" else "chat examples ({\"messages\": [...]} and the " \
                "other supervised formats)"
        raise BudwoodError(f"invalid {param}: {file.id} holds {holds} ({file.format}); method {method!r} needs "
                           f"{wants}", code=f"invalid_{param}", param=param)


class ServingFineTuning:
    """The fine-tuning jobs surface (held on `app.state.serving_jobs`); every method is scoped to one tenant."""

    def __init__(self, service: Service, poll_s: float = 0.5):
        self.queue, self.config = service.queue, service.config
        self.poll_s = poll_s

    def job_values(self, tenant: str, body: JobCreate) -> dict:
        """The new job's columns, once every part of the request has been checked."""
        check_method(body)
        if body.model != self.config.serving.base:
            raise BudwoodError(f"Model {body.model!r} is not available for fine-tuning here; this service "
                               f"fine-tunes {self.config.serving.base!r}", code="model_not_available", param="model")
        for param in ("training_file", "validation_file"):
            check_kind(self.queue.check_file(tenant, getattr(body, param), param), body.method_type, param)
        return {"model": body.model, "training_file": body.training_file, "validation_file": body.validation_file,
                "suffix": body.suffix, "seed": body.seed if body.seed is not None else secrets.randbelow(2**31),
                "meta": body.metadata,
                "integrations": [i.model_dump(mode="json") for i in body.integrations] if body.integrations else None,
                "hyperparameters": {**body.requested_hyperparameters().model_dump(), "method": body.method_type}}

    async def create(self, tenant: str, body: JobCreate, idempotency_key: str | None) -> FineTuningJob:
        """A new job in validating_files, or the one this idempotency key made before."""
        values = await asyncio.to_thread(self.job_values, tenant, body)
        job, _ = await asyncio.to_thread(self.queue.create_job, tenant, values, idempotency_key,
                                         request_hash(body.model_dump(mode="json")))
        return FineTuningJob.of(job)

    async def list(self, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None,
                   no_metadata: bool = False) -> Page[FineTuningJob]:
        rows, more = await asyncio.to_thread(self.queue.list_jobs, tenant, after, limit, metadata, no_metadata)
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
        rows, more = await asyncio.to_thread(self.queue.checkpoints_of, job, after, limit)
        return Page[FineTuningJobCheckpoint].of([FineTuningJobCheckpoint.of(c, job) for c in rows], more)

    async def grant(self, tenant: str, checkpoint: str, project_ids: list[str]) -> Page[CheckpointPermissionObject]:
        rows = await asyncio.to_thread(self.queue.grant, tenant, checkpoint, project_ids)
        return Page[CheckpointPermissionObject].of([CheckpointPermissionObject.of(p) for p in rows], False)

    async def permissions(self, tenant: str, checkpoint: str, project_id: str | None, after: str | None, limit: int,
                          order: str) -> Page[CheckpointPermissionObject]:
        rows, more = await asyncio.to_thread(self.queue.permissions, tenant, checkpoint, project_id, after, limit,
                                             order)
        return Page[CheckpointPermissionObject].of([CheckpointPermissionObject.of(p) for p in rows], more)

    async def revoke_permission(self, tenant: str, checkpoint: str, permission_id: str) -> CheckpointPermissionDeleted:
        await asyncio.to_thread(self.queue.revoke_permission, tenant, checkpoint, permission_id)
        return CheckpointPermissionDeleted(id=permission_id)

    async def delete_model(self, tenant: str, model: str) -> ModelDeleted:
        """Only the tenant's own ft: models; a checkpoint's model stays with its job (it is not deleted alone)."""
        if split_model(model)[1] is not None:
            raise BudwoodError(f"{model} is a checkpoint's model; checkpoints stay with their job and are not deleted "
                               "alone (revoke its permissions instead)", code="invalid_value", param="model")
        await asyncio.to_thread(self.queue.delete_model, tenant, model)
        return ModelDeleted(id=model)

    async def live_events(self, tenant: str, job_id: str) -> AsyncIterator[dict]:
        """The job's events, oldest first, as they are written, until the job has ended or paused (the
        route's stream then ends with [DONE]). Each poll reads the job, then its new events, so the
        events that ended it are sent; the first poll refuses a job the tenant does not have."""
        last = 0
        while True:
            job = await asyncio.to_thread(self.queue.get_job, tenant, job_id)
            rows, _ = await asyncio.to_thread(self.queue.events_of, job, None, 0, last)
            for e in rows:
                last = e.seq
                yield FineTuningJobEvent.of(e).model_dump(mode="json")
            if job.status in QUIET:
                return
            if not rows:
                await asyncio.sleep(self.poll_s)
