"""/health (is the server up, and how busy) and /metrics (Prometheus), outside /v1 and its API keys."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from budwood.serve.protocol import Health
from budwood.serve.serving import ServingDep

router = APIRouter()


@router.get("/health")
async def health(serving: ServingDep) -> Health:
    return serving.health()


@router.get("/metrics")
async def metrics(request: Request, serving: ServingDep) -> Response:
    body, content_type = serving.render_metrics(request.headers.get("authorization", ""))
    return Response(body, media_type=content_type)
