"""OpenAI's fine-tuning API: /v1/files and /v1/fine_tuning/jobs, every route scoped to the caller's tenant.

Another tenant's file, job or checkpoint is answered 404, exactly as one that does not exist. Uploads
are read as JSONL text and checked by the same validator as `budwood data check` before they are
accepted (errors name the line and the problem); nothing uploaded is ever executed or unpickled.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse

from budwood.jobs.protocol import (
    TERMINAL,
    JobCreate,
    checkpoint_object,
    event_object,
    file_object,
    job_object,
    page,
)
from budwood.jobs.queue import ServiceError, new_id, request_hash
from budwood.serve.auth import caller_of

PURPOSES = ("fine-tune",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]")
_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}}


def _tenant(request: Request) -> str:
    tenant = caller_of(request).tenant
    if tenant is None:
        raise ServiceError("this route needs a tenant's API key", 401, "invalid_api_key")
    return tenant


def safe_filename(name: str | None) -> str:
    """The client's file name, for display only: no folders, no control or odd characters."""
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).strip(" .") or "upload.jsonl"
    return base[:200]


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise ServiceError(f"the upload is larger than this service's limit of {limit:,} bytes per file", 413,
                               "file_too_large", "file")
        yield chunk


def files_router(service) -> APIRouter:
    router = APIRouter(prefix="/v1/files", tags=["files"])
    queue, storage, config = service.queue, service.storage, service.config

    def validate_upload(path: Path) -> tuple[str, int]:
        from budwood.data.formats import read_dataset
        from budwood.errors import DataError

        try:
            dataset = read_dataset(path, "auto", min_examples=1)
        except DataError as e:  # told by the client's file name, never the scratch copy's path
            issues = e.issues or []
            shown = "\n".join(str(i) for i in issues[:20]) if issues else str(e)
            shown = shown.replace(str(path), path.name).replace(str(path.parent) + "/", "")
            more = f"\n... and {len(issues) - 20} more" if len(issues) > 20 else ""
            head = f"{path.name}: {len([i for i in issues if i.level == 'error'])} error(s); nothing was stored:\n" \
                if issues else ""
            raise ServiceError(head + shown + more, 400, "invalid_file", "file") from None
        return dataset.format, len(dataset.conversations)

    @router.post("", openapi_extra=_UPLOAD_SCHEMA)
    async def upload(request: Request):
        """Upload a JSONL training or validation file (multipart: `file`, `purpose=fine-tune`)."""
        from starlette.formparsers import MultiPartException, MultiPartParser

        tenant = _tenant(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ServiceError("expected a multipart/form-data body with fields 'file' and 'purpose'", 400,
                               "invalid_request", "file")
        limit = config.quotas.file_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + (64 << 10):
            raise ServiceError(f"the upload is larger than this service's limit of {limit:,} bytes per file", 413,
                               "file_too_large", "file")
        try:
            form = await MultiPartParser(request.headers, _limited(request.stream(), limit + (64 << 10)),
                                         max_files=1, max_fields=8).parse()
        except MultiPartException as e:
            raise ServiceError(f"the multipart body cannot be read: {e.message}", 400, "invalid_request",
                               "file") from None
        purpose, upload = form.get("purpose"), form.get("file")
        try:
            if not isinstance(purpose, str) or purpose not in PURPOSES:
                raise ServiceError(f"purpose {purpose!r} is not supported here; this service accepts "
                                   f"{', '.join(PURPOSES)}", 400, "invalid_value", "purpose")
            if upload is None or isinstance(upload, str):
                raise ServiceError("the field 'file' must be a file", 400, "invalid_value", "file")
            tmp = storage.tmp_dir()
            try:
                path = tmp / safe_filename(upload.filename)
                digest, size = hashlib.sha256(), 0
                with open(path, "wb") as out:
                    while chunk := await upload.read(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if size > limit:
                    raise ServiceError(f"the file has {size:,} bytes; this service's limit is {limit:,}", 413,
                                       "file_too_large", "file")
                format_, examples = await asyncio.to_thread(validate_upload, path)
                file_id = new_id("file-")
                row = await asyncio.to_thread(queue.add_file, tenant, file_id, path.name, purpose, size,
                                              digest.hexdigest(), format_, examples,
                                              lambda: storage.put_file(tenant, file_id, path))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            await form.close()
        return file_object(row)

    @router.get("")
    async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                         limit: int = Query(10000, ge=1, le=10000), order: str = Query("desc", pattern="^(asc|desc)$")):
        rows, more = await asyncio.to_thread(queue.list_files, _tenant(request), purpose, after, limit, order)
        return page([file_object(r) for r in rows], more)

    @router.get("/{file_id}")
    async def retrieve(file_id: str, request: Request):
        return file_object(await asyncio.to_thread(queue.get_file, _tenant(request), file_id))

    @router.delete("/{file_id}")
    async def delete(file_id: str, request: Request):
        tenant = _tenant(request)
        await asyncio.to_thread(queue.delete_file, tenant, file_id, lambda: storage.delete_file(tenant, file_id))
        return {"id": file_id, "object": "file", "deleted": True}

    @router.get("/{file_id}/content")
    async def content(file_id: str, request: Request):
        tenant = _tenant(request)
        row = await asyncio.to_thread(queue.get_file, tenant, file_id)
        return FileResponse(storage.file_path(tenant, row.id), media_type="application/octet-stream",
                            filename=row.filename)

    return router


def jobs_router(service) -> APIRouter:
    router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
    queue, config = service.queue, service.config

    def check_file(tenant: str, file_id: str | None, param: str) -> None:
        if file_id is None:
            return
        try:
            row = queue.get_file(tenant, file_id, param)
        except ServiceError:
            raise ServiceError(f"invalid {param}: {file_id} does not exist", 400, f"invalid_{param}", param) from None
        if row.purpose != "fine-tune":
            raise ServiceError(f"invalid {param}: {file_id} has purpose {row.purpose!r}; upload it with purpose "
                               "'fine-tune'", 400, f"invalid_{param}", param)

    def create_values(tenant: str, body: JobCreate) -> dict:
        if body.method is not None and body.method.type != "supervised":
            raise ServiceError(f"method.type {body.method.type!r} is not supported here; this service runs "
                               "supervised (LoRA) fine-tuning", 400, "unsupported_method", "method.type")
        if body.method is not None and body.hyperparameters is not None and body.method.supervised is not None \
                and body.hyperparameters != body.method.supervised.hyperparameters:
            raise ServiceError("hyperparameters and method.supervised.hyperparameters disagree; give them once, "
                               "under method", 400, "invalid_value", "hyperparameters")
        if body.integrations:
            raise ServiceError("integrations are not supported by this service (it reaches no outside service); "
                               "follow training through /events or the dashboard", 400, "unsupported_parameter",
                               "integrations")
        if body.model != config.serving.base:
            raise ServiceError(f"Model {body.model!r} is not available for fine-tuning here; this service "
                               f"fine-tunes {config.serving.base!r}", 400, "model_not_available", "model")
        check_file(tenant, body.training_file, "training_file")
        check_file(tenant, body.validation_file, "validation_file")
        return {"model": body.model, "training_file": body.training_file, "validation_file": body.validation_file,
                "suffix": body.suffix, "seed": body.seed if body.seed is not None else secrets.randbelow(2**31),
                "meta": body.metadata, "hyperparameters": body.requested_hyperparameters().model_dump()}

    @router.post("")
    async def create(body: JobCreate, request: Request,
                     idempotency_key: str | None = Header(None, max_length=255)):
        """Create a job: it validates its files, waits for a worker, trains, is evaluated and published."""
        tenant = _tenant(request)
        values = await asyncio.to_thread(create_values, tenant, body)
        job, _ = await asyncio.to_thread(queue.create_job, tenant, values, idempotency_key,
                                         request_hash(body.model_dump(mode="json")))
        return job_object(job)

    @router.get("")
    async def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
        metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                    if k.startswith("metadata[") and k.endswith("]")}
        rows, more = await asyncio.to_thread(queue.list_jobs, _tenant(request), after, limit, metadata or None)
        return page([job_object(j) for j in rows], more)

    @router.get("/{job_id}")
    async def retrieve(job_id: str, request: Request):
        return job_object(await asyncio.to_thread(queue.get_job, _tenant(request), job_id))

    @router.post("/{job_id}/cancel")
    async def cancel(job_id: str, request: Request):
        return job_object(await asyncio.to_thread(queue.cancel, _tenant(request), job_id))

    @router.post("/{job_id}/pause")
    async def pause(job_id: str, request: Request):
        return job_object(await asyncio.to_thread(queue.pause, _tenant(request), job_id))

    @router.post("/{job_id}/resume")
    async def resume(job_id: str, request: Request):
        return job_object(await asyncio.to_thread(queue.resume, _tenant(request), job_id))

    @router.get("/{job_id}/events")
    async def events(job_id: str, request: Request, after: str | None = None,
                     limit: int = Query(20, ge=1, le=1000), stream: bool = False):
        """Newest first, paginated; with `stream=true`, server-sent events oldest first, live, until the
        job ends (then `[DONE]`)."""
        tenant = _tenant(request)
        if not stream:
            rows, more = await asyncio.to_thread(queue.events, tenant, job_id, after, limit)
            return page([event_object(e) for e in rows], more)
        await asyncio.to_thread(queue.get_job, tenant, job_id)
        return live_events(queue, tenant, job_id)

    @router.get("/{job_id}/checkpoints")
    async def checkpoints(job_id: str, request: Request, after: str | None = None,
                          limit: int = Query(10, ge=1, le=100)):
        tenant = _tenant(request)
        job = await asyncio.to_thread(queue.get_job, tenant, job_id)
        rows, more = await asyncio.to_thread(queue.checkpoints, tenant, job_id, after, limit)
        return page([checkpoint_object(c, job) for c in rows], more)

    return router


def live_events(queue, tenant: str | None, job_id: str, poll_s: float = 0.5):
    """An SSE response of a job's events as they are written; ends once the job has ended."""
    from sse_starlette.sse import EventSourceResponse

    async def stream():
        last = 0
        while True:
            rows, _ = await asyncio.to_thread(queue.events, tenant, job_id, None, 0, last)
            for e in rows:
                last = e.seq
                yield {"data": json.dumps(event_object(e), separators=(",", ":"))}
            if not rows:
                job = await asyncio.to_thread(queue.get_job, tenant, job_id)
                if job.status in TERMINAL + ("paused",):
                    rows, _ = await asyncio.to_thread(queue.events, tenant, job_id, None, 0, last)
                    for e in rows:
                        last = e.seq
                        yield {"data": json.dumps(event_object(e), separators=(",", ":"))}
                    yield {"data": "[DONE]"}
                    return
                await asyncio.sleep(poll_s)

    return EventSourceResponse(stream(), ping=15, sep="\n")
