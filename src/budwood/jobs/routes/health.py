"""/health of the service: the serving engine's, plus its workers (alive of expected, on this machine) and
its queue (jobs waiting, and how long the oldest has waited). Not "ok" (503) while this server is meant to
run workers and none is alive: a load balancer or an operator's check then sees that jobs cannot move.
Mounted before serve's /health, which it answers in its place."""
from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from budwood.serve.serving import ServingDep

router = APIRouter()


class Workers(BaseModel):
    alive: int
    expected: int  # the worker processes `budwood service` runs here (config.workers); others are not counted


class Backlog(BaseModel):
    waiting: int
    oldest_age_s: float | None


class ServiceHealth(BaseModel):
    status: Literal["ok", "degraded"]
    model: str
    in_flight: int
    workers: Workers
    queue: Backlog


@router.get("/health", response_model=ServiceHealth, operation_id="service_health")
async def health(request: Request, serving: ServingDep) -> JSONResponse:
    base = serving.health()
    supervisor = getattr(request.app.state, "supervisor", None)
    workers = Workers(alive=supervisor.alive(), expected=supervisor.expected) if supervisor is not None else \
        Workers(alive=0, expected=0)
    waiting, oldest = await asyncio.to_thread(request.app.state.serving_jobs.queue.backlog)
    ok = workers.expected == 0 or workers.alive > 0
    body = ServiceHealth(status="ok" if ok else "degraded", model=base.model, in_flight=base.in_flight,
                         workers=workers, queue=Backlog(waiting=waiting, oldest_age_s=oldest))
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)
