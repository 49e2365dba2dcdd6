"""`GET /v1/models` in OpenAI list shape, and one model by id."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from diffuserve.api.deps import require_auth, service_of
from diffuserve.errors import ModelNotFound
from diffuserve.protocol import ModelCard, ModelList

router = APIRouter(dependencies=[Depends(require_auth)])


def _card(request: Request) -> ModelCard:
    service = service_of(request)
    card = ModelCard(id=service.name, created=int(service.started_at), root=service.settings.model_repo)
    model = service.model
    if model is not None:
        card.supports_negative_prompt = model.supports_negative_prompt
        card.default_size = f"{model.native_width}x{model.native_height}"
        card.default_steps = model.default_steps
        card.default_guidance = model.default_guidance
    return card


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request)])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    if model_id not in service_of(request).aliases:
        raise ModelNotFound(f"model {model_id!r} is not served here", param="model")
    return _card(request)
