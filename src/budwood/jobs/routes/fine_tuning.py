"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause and resume jobs, and read their events
(as a page or a live server-sent stream) and checkpoints; /v1/fine_tuning/checkpoints/{ckpt}/permissions:
which other tenants may use a checkpoint's model; DELETE /v1/models/{ft model} (OpenAI's Fine-tuning API)."""
from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request

from budwood.errors import BudwoodError
from budwood.jobs.protocol import (
    CheckpointPermissionDeleted,
    CheckpointPermissionObject,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobCreate,
    ModelDeleted,
    Page,
    PermissionCreate,
)
from budwood.jobs.routes.deps import JobsDep, TenantDep
from budwood.serve.limits import LimitedRoute
from budwood.serve.sse import stream_response

# JSON bodies only: read under the server's limits (size, nesting) before FastAPI parses them, as the inference
# routes are (files and upload parts are multipart and held to the quotas instead)
router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], route_class=LimitedRoute)
checkpoints_router = APIRouter(prefix="/v1/fine_tuning/checkpoints", tags=["fine-tuning"], route_class=LimitedRoute)
models_router = APIRouter(tags=["fine-tuning"], route_class=LimitedRoute)


@router.post("", response_model=FineTuningJob)
async def create(body: JobCreate, tenant: TenantDep, jobs: JobsDep,
                 idempotency_key: str | None = Header(None, max_length=255)) -> FineTuningJob:
    """Create a job: it validates its files, waits for a worker, trains, is evaluated and published."""
    return await jobs.create(tenant, body, idempotency_key)


@router.get("", response_model=Page[FineTuningJob])
async def list_jobs(request: Request, tenant: TenantDep, jobs: JobsDep, after: str | None = None,
                    limit: int = Query(20, ge=1, le=100)) -> Page[FineTuningJob]:
    """Newest first; `metadata[KEY]=VALUE` keeps the jobs whose metadata has it, `metadata=null` the jobs
    without metadata (OpenAI's two forms, which do not combine)."""
    metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                if k.startswith("metadata[") and k.endswith("]")}
    bare = request.query_params.get("metadata")
    if bare is not None and (bare != "null" or metadata):
        raise BudwoodError("metadata: filter with metadata[KEY]=VALUE, or metadata=null for jobs without metadata "
                           "(not both)", code="invalid_value", param="metadata")
    return await jobs.list(tenant, after, limit, metadata or None, no_metadata=bare == "null")


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


@checkpoints_router.post("/{checkpoint}/permissions", response_model=Page[CheckpointPermissionObject])
async def grant(checkpoint: str, body: PermissionCreate, tenant: TenantDep, jobs: JobsDep
                ) -> Page[CheckpointPermissionObject]:
    """Let other tenants (`project_ids`: OpenAI's projects are this service's tenants) use the checkpoint's model."""
    return await jobs.grant(tenant, checkpoint, body.project_ids)


@checkpoints_router.get("/{checkpoint}/permissions", response_model=Page[CheckpointPermissionObject])
async def permissions(checkpoint: str, tenant: TenantDep, jobs: JobsDep, project_id: str | None = None,
                      after: str | None = None, limit: int = Query(10, ge=1, le=100),
                      order: str = Query("descending", pattern="^(ascending|descending)$")
                      ) -> Page[CheckpointPermissionObject]:
    return await jobs.permissions(tenant, checkpoint, project_id, after, limit, order)


@checkpoints_router.delete("/{checkpoint}/permissions/{permission_id}", response_model=CheckpointPermissionDeleted)
async def revoke(checkpoint: str, permission_id: str, tenant: TenantDep, jobs: JobsDep) -> CheckpointPermissionDeleted:
    return await jobs.revoke_permission(tenant, checkpoint, permission_id)


@models_router.delete("/v1/models/{model:path}", response_model=ModelDeleted)
async def delete_model(model: str, tenant: TenantDep, jobs: JobsDep) -> ModelDeleted:
    """The tenant's own fine-tuned model is served no more (its job and checkpoints stay)."""
    return await jobs.delete_model(tenant, model)
