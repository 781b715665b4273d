"""/v1/completions."""
from __future__ import annotations

from fastapi import APIRouter, Request

from budwood.serve.auth import CallerDep
from budwood.serve.limits import LimitedRoute
from budwood.serve.protocol import CompletionRequest
from budwood.serve.serving import ServingDep

router = APIRouter(route_class=LimitedRoute)  # bodies read under ServeLimits


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request, serving: ServingDep, caller: CallerDep):
    return await serving.create_completion(body, caller, request)
