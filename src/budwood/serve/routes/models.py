"""/v1/models: the base and every adapter the caller may use, each with the base as its parent."""
from __future__ import annotations

from fastapi import APIRouter

from budwood.serve.auth import CallerDep
from budwood.serve.protocol import ModelCard, ModelList
from budwood.serve.serving import ServingDep

router = APIRouter()


@router.get("/v1/models")
async def list_models(serving: ServingDep, caller: CallerDep) -> ModelList:
    return await serving.list_models(caller)


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, serving: ServingDep, caller: CallerDep) -> ModelCard:
    return await serving.model_card(caller, model)
