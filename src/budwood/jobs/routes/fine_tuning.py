"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause and resume jobs, and read their events
(as a page or a live server-sent stream) and checkpoints (OpenAI's Fine-tuning API)."""
from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request

from budwood.jobs.protocol import FineTuningJob, FineTuningJobCheckpoint, FineTuningJobEvent, JobCreate, Page
from budwood.jobs.routes.deps import JobsDep, TenantDep
from budwood.serve.sse import stream_response

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("", response_model=FineTuningJob)
async def create(body: JobCreate, tenant: TenantDep, jobs: JobsDep,
                 idempotency_key: str | None = Header(None, max_length=255)) -> FineTuningJob:
    """Create a job: it validates its files, waits for a worker, trains, is evaluated and published."""
    return await jobs.create(tenant, body, idempotency_key)


@router.get("", response_model=Page[FineTuningJob])
async def list_jobs(request: Request, tenant: TenantDep, jobs: JobsDep, after: str | None = None,
                    limit: int = Query(20, ge=1, le=100)) -> Page[FineTuningJob]:
    """Newest first; `metadata[KEY]=VALUE` keeps the jobs whose metadata has it."""
    metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                if k.startswith("metadata[") and k.endswith("]")}
    return await jobs.list(tenant, after, limit, metadata or None)


@router.get("/{job_id}", response_model=FineTuningJob)
async def retrieve(job_id: str, tenant: TenantDep, jobs: JobsDep) -> FineTuningJob:
    return await jobs.retrieve(tenant, job_id)


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
async def cancel(job_id: str, tenant: TenantDep, jobs: JobsDep) -> FineTuningJob:
    return await jobs.cancel(tenant, job_id)


@router.post("/{job_id}/pause", response_model=FineTuningJob)
async def pause(job_id: str, tenant: TenantDep, jobs: JobsDep) -> FineTuningJob:
    return await jobs.pause(tenant, job_id)


@router.post("/{job_id}/resume", response_model=FineTuningJob)
async def resume(job_id: str, tenant: TenantDep, jobs: JobsDep) -> FineTuningJob:
    return await jobs.resume(tenant, job_id)


@router.get("/{job_id}/events", response_model=Page[FineTuningJobEvent])
async def events(job_id: str, tenant: TenantDep, jobs: JobsDep, after: str | None = None,
                 limit: int = Query(20, ge=1, le=1000), stream: bool = False):
    """Newest first, paginated; with `stream=true`, server-sent events oldest first, live, until the
    job ends (then `[DONE]`)."""
    if not stream:
        return await jobs.events(tenant, job_id, after, limit)
    return await stream_response(jobs.live_events(tenant, job_id))


@router.get("/{job_id}/checkpoints", response_model=Page[FineTuningJobCheckpoint])
async def checkpoints(job_id: str, tenant: TenantDep, jobs: JobsDep, after: str | None = None,
                      limit: int = Query(10, ge=1, le=100)) -> Page[FineTuningJobCheckpoint]:
    return await jobs.checkpoints(tenant, job_id, after, limit)
