"""The job manager of one app, wired to the API's validation, answers and image store."""

from __future__ import annotations

import orjson

from diffuserve.api.image_store import ImageStore
from diffuserve.api.job_requests import job_fields, validate_job
from diffuserve.api.job_views import job_answer, webhook_payload
from diffuserve.config import Settings
from diffuserve.serving.service import GenerationService, JobManager, JobObserver, JobRecord
from diffuserve.types import Completed, GenerationRequest


def make_job_manager(
    settings: Settings, service: GenerationService, store: ImageStore, observer: JobObserver
) -> JobManager:
    async def prepare(record: JobRecord) -> GenerationRequest:
        """A stored job's body validated again after a restart (its seed was fixed when it was stored)."""
        fields, operation, _ = job_fields(orjson.loads(record.body))
        valid = await validate_job(fields, operation, job_id=record.id, service=service, settings=settings)
        return valid.generation

    async def render(record: JobRecord, generation: GenerationRequest, done: Completed) -> bytes:
        body = orjson.loads(record.body)
        return await job_answer(
            record,
            generation,
            done,
            model=service.model_for(record.model),
            response_format=body.get("response_format"),
            quality=body.get("quality"),
            store=store,
        )

    return JobManager(
        service, settings, prepare=prepare, render=render, payload=webhook_payload, observer=observer
    )
