"""/v1/load_lora_adapter and /v1/unload_lora_adapter, vLLM's names and answers; the operator's only."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from budwood.serve.auth import operator_only
from budwood.serve.limits import LimitedRoute
from budwood.serve.protocol import LoadAdapterRequest, UnloadAdapterRequest
from budwood.serve.serving import ServingDep

router = APIRouter(dependencies=[Depends(operator_only)], route_class=LimitedRoute)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadAdapterRequest, serving: ServingDep) -> PlainTextResponse:
    await serving.load_adapter(body)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadAdapterRequest, serving: ServingDep) -> PlainTextResponse:
    serving.unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
