"""/v1/chat/completions."""
from __future__ import annotations

from fastapi import APIRouter, Request

from budwood.serve.auth import CallerDep
from budwood.serve.limits import LimitedRoute
from budwood.serve.protocol import ChatCompletionRequest
from budwood.serve.serving import ServingDep

router = APIRouter(route_class=LimitedRoute)  # bodies read under ServeLimits


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, serving: ServingDep,
                                 caller: CallerDep):
    return await serving.create_chat_completion(body, caller, request)
