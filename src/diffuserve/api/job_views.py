"""What jobs look like on the wire: a job's status object, its answer (the synchronous route's body) and the
webhook payload."""

from __future__ import annotations

import datetime
from typing import Any

import orjson

from diffuserve.api.image_data import answer_body, b64_image_data, stored_image_data
from diffuserve.api.image_store import ImageStore
from diffuserve.serving.service import JobRecord, JobStatus
from diffuserve.types import Completed, GenerationRequest, JobState, ModelInfo

JOBS_PATH = "/v1/images/jobs"


def status_url(base: str, job_id: str) -> str:
    return f"{base}{JOBS_PATH}/{job_id}"


def job_view(status: JobStatus, *, with_result: bool = True) -> dict[str, Any]:
    """A job as `GET /v1/images/jobs/{id}` answers it: `queued` with its `queue_position`, `running` with its
    `progress`, `succeeded` with `result` (what the synchronous request answers), `failed` with `error`."""
    record = status.record
    state = JobState(record.state)
    if not state.final:
        state = JobState.RUNNING if status.step is not None else JobState.QUEUED
    view: dict[str, Any] = {
        "id": record.id,
        "object": "image.job",
        "status": state.value,
        "operation": record.operation,
        "model": record.model,
        "priority": record.priority,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "attempts": record.attempts,
        "status_url": status_url(record.base_url, record.id),
    }
    if state is JobState.QUEUED:
        view["queue_position"] = status.position
    if state is JobState.RUNNING:
        view["progress"] = {"step": status.step, "steps": status.steps}
    if record.webhook_url:
        view["webhook"] = {
            "url": record.webhook_url,
            "state": record.webhook_state,
            "attempts": record.webhook_attempts,
        }
    if record.error is not None:
        view["error"] = orjson.loads(record.error)["error"]
        view["error_status"] = record.error_status
    if with_result and record.result is not None:
        view["result"] = orjson.Fragment(record.result)
    return view


def webhook_payload(record: JobRecord) -> bytes:
    """The body posted to a job's webhook_url when it ends (Standard Webhooks' type/timestamp/data shape)."""
    stamp = datetime.datetime.fromtimestamp(record.finished_at or 0, datetime.timezone.utc)
    return orjson.dumps(
        {
            "type": f"image.job.{record.state}",
            "timestamp": stamp.isoformat().replace("+00:00", "Z"),
            "data": job_view(JobStatus(record)),
        }
    )


async def job_answer(
    record: JobRecord,
    generation: GenerationRequest,
    done: Completed,
    *,
    model: ModelInfo,
    response_format: str | None,
    quality: str | None,
    store: ImageStore,
) -> bytes:
    """The body the synchronous route would have answered: base64 images, or URLs of the image store's
    copies made for the job's API key."""
    if response_format == "url":
        data = await stored_image_data(store, done.images, record.owner, record.base_url)
    else:
        data = b64_image_data(done.images)
    return answer_body(model, generation, quality, data, done.text_tokens)
