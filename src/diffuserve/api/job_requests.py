"""A job's body validated as its synchronous twin would be: at submission, and again after a restart."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Literal

from diffuserve.api.edit_body import EditBody, edit_body_from_json, fitted_edit
from diffuserve.config import Settings
from diffuserve.errors import InvalidRequest
from diffuserve.protocol import ImageGenerationRequest
from diffuserve.protocol.edits import ImageEditRequest
from diffuserve.serving.service import GenerationService
from diffuserve.types import GenerationRequest, ModelInfo

OPERATIONS = ("generations", "edits")
Operation = Literal["generations", "edits"]


@dataclass
class ValidJob:
    """A job body that passed every check of its synchronous route, with the request it runs as."""

    body: ImageGenerationRequest
    model: ModelInfo
    generation: GenerationRequest
    operation: Operation


def job_fields(payload: Any) -> tuple[dict[str, Any], Operation, str | None]:
    """The body's own fields, apart from the two a job adds: `operation` and `webhook_url`."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    fields = dict(payload)
    operation = fields.pop("operation", "generations")
    if operation not in OPERATIONS:
        raise InvalidRequest(
            f"operation must be one of {', '.join(OPERATIONS)}, got {operation!r}", param="operation"
        )
    webhook_url = fields.pop("webhook_url", None)
    if webhook_url is not None and not isinstance(webhook_url, str):
        raise InvalidRequest("webhook_url must be a string (an http(s) URL)", param="webhook_url")
    if fields.get("stream"):
        raise InvalidRequest(
            "a job is not streamed: poll its status_url, or give webhook_url to be called when it ends",
            param="stream",
        )
    return fields, operation, webhook_url


async def validate_job(
    fields: dict[str, Any],
    operation: Operation,
    *,
    job_id: str,
    service: GenerationService,
    settings: Settings,
    model_for: Any = None,
) -> ValidJob:
    """Everything the synchronous route checks, in the same order; an edit's pictures decoded in a thread."""
    find_model = model_for or service.model_for
    if operation == "generations":
        body = ImageGenerationRequest.parse(fields)
        model = find_model(body.model)
        generation = body.to_generation(
            request_id=job_id,
            model=model,
            max_images=settings.max_images_per_request,
            max_cost=settings.max_request_cost,
        )
    else:
        received: EditBody = edit_body_from_json(fields)
        edit = ImageEditRequest.parse(received.fields)
        assert isinstance(edit, ImageEditRequest)
        body, model = edit, find_model(edit.model)
        generation = await asyncio.to_thread(
            fitted_edit,
            edit,
            received,
            request_id=job_id,
            model=model,
            settings=settings,
            stop=threading.Event(),
        )
    generation.loras = await service.resolve_adapters(model, body.adapters)
    return ValidJob(body, model, generation, operation)
