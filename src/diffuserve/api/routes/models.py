"""`GET /v1/models` in OpenAI list shape (every served model), one model by id or alias, and `GET /v1/loras`
(the adapters requests may name)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from diffuserve.api.deps import require_auth, service_of
from diffuserve.protocol import ModelCard, ModelList
from diffuserve.serving.service import GenerationService, ModelService

router = APIRouter(dependencies=[Depends(require_auth)])


def _card(service: GenerationService, served: ModelService) -> ModelCard:
    card = ModelCard(id=served.name, created=int(service.started_at), root=served.spec.repo)
    model = served.model
    if model is not None:
        card.family = model.family
        card.supports_negative_prompt = model.supports_negative_prompt
        card.default_size = f"{model.native_width}x{model.native_height}"
        card.default_steps = model.default_steps
        card.default_guidance = model.default_guidance
    return card


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(request: Request) -> ModelList:
    service = service_of(request)
    return ModelList(data=[_card(service, served) for served in service.models.values()])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    service = service_of(request)
    return _card(service, service.service_for(model_id))  # ModelNotFound (404) names the served ones


@router.get("/v1/loras")
@router.get("/loras", include_in_schema=False)
async def list_loras(request: Request) -> dict[str, Any]:
    """The adapters a request may name in `loras`: id, rank, layers, bytes and the models that take each
    (those loaded so far); an unusable file is listed with its error."""
    service = service_of(request)
    return {"object": "list", "data": await asyncio.to_thread(service.describe_adapters)}
