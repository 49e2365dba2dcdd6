"""`/v1/images/jobs`: submit a generation or edit to run without holding a connection, read its status and
answer, list a key's jobs, cancel one."""

from __future__ import annotations

import math
import secrets
import time
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request, Response

from diffuserve.api.body_budget import hold_body
from diffuserve.api.deps import read_body, require_auth, service_of, settings_of
from diffuserve.api.image_data import owner_of
from diffuserve.api.job_requests import job_fields, validate_job
from diffuserve.api.job_views import JOBS_PATH, job_view, status_url
from diffuserve.api.middleware import ascii_header
from diffuserve.api.public_url import base_url
from diffuserve.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from diffuserve.protocol import decode_json
from diffuserve.protocol.generation import describe_unknown_fields
from diffuserve.serving.service import JobManager, JobRecord, check_webhook_url
from diffuserve.types import JobState, Priority

router = APIRouter(dependencies=[Depends(require_auth)])
MAX_LIST = 100
T = TypeVar("T", int, float)


def jobs_of(request: Request) -> JobManager:
    jobs: JobManager = request.app.state.jobs
    return jobs


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


@router.post("/v1/images/jobs", status_code=202)
@router.post("/images/jobs", include_in_schema=False)
async def submit_job(request: Request) -> Response:
    """A generation (or, with `operation: "edits"`, an edit with data-URL pictures) as a job: 202 with its id
    and status_url at once; `webhook_url` is called when it ends. `priority` defaults to `batch`."""
    settings, service = settings_of(request), service_of(request)
    request.app.state.drain.refuse_if_draining()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            "a job's body is JSON (an edit sends its pictures as data URLs in `images`)", param="Content-Type"
        )
    with hold_body(request, settings.max_upload_bytes):
        raw = await read_body(request, settings.max_upload_bytes, settings.body_timeout)
        payload = decode_json(raw) if raw.strip() else None
        fields, operation, webhook_url = job_fields(payload)
        if webhook_url is not None:
            if settings.webhook_secret is None:
                raise InvalidRequest(
                    "this server signs webhooks with WEBHOOK_SECRET, which is not set; poll status_url instead",
                    param="webhook_url",
                )
            check_webhook_url(webhook_url, settings.webhook_allow_private)
        if operation == "generations" and len(raw) > settings.max_body_bytes:
            raise PayloadTooLarge(
                f"a generation job's body of {len(raw)} bytes exceeds the limit of {settings.max_body_bytes} bytes"
            )
        if fields.get("priority") is None:
            fields["priority"] = Priority.BATCH.value
        job_id = "job_" + secrets.token_hex(12)

        def model_for(requested: str | None) -> Any:
            return service.model_for(requested or request.headers.get("x-model-name") or None)

        valid = await validate_job(
            fields, operation, job_id=job_id, service=service, settings=settings, model_for=model_for
        )
    if valid.body.model_extra:
        request.state.ignored_fields = ascii_header(describe_unknown_fields(list(valid.body.model_extra)))
    # The seed is fixed now, so the job gives the same images if it runs again after a restart; unknown
    # fields are not kept.
    known = {k: v for k, v in fields.items() if k not in (valid.body.model_extra or {})}
    stored = {**known, "seed": valid.generation.seed, "model": valid.model.name, "operation": operation}
    record = JobRecord(
        id=job_id,
        owner=owner_of(request),
        model=valid.model.name,
        operation=operation,
        priority=str(valid.generation.priority),
        state=JobState.QUEUED.value,
        created_at=time.time(),
        body=orjson.dumps(stored),
        base_url=base_url(request, settings.public_url),
        webhook_url=webhook_url,
    )
    status = await jobs_of(request).submit(record, valid.generation)
    return _json(job_view(status), 202, {"location": status_url(record.base_url, job_id)})


@router.get("/v1/images/jobs")
@router.get("/images/jobs", include_in_schema=False)
async def list_jobs(request: Request) -> Response:
    """This API key's jobs, newest first, without their answers. Query: `limit` (1-100, default 20) and
    `before`, a created_at to page from."""
    limit = _query_number(request, "limit", int, 20)
    before = _query_number(request, "before", float, None)
    if limit is None or not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIST}, got {limit}", param="limit")
    found = await jobs_of(request).owned(owner_of(request), limit + 1, before)
    data = [job_view(status, with_result=False) for status in found[:limit]]
    return _json({"object": "list", "data": data, "has_more": len(found) > limit})


def _query_number(request: Request, name: str, kind: type[T], default: T | None) -> T | None:
    """A numeric query parameter; a malformed one is a 400 in the error envelope naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)  # type: ignore[call-arg]
    except ValueError:
        raise InvalidRequest(f"{name} must be a number, got {raw[:40]!r}", param=name) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {raw[:40]!r}", param=name)
    return value


@router.get(JOBS_PATH + "/{job_id}")
@router.get("/images/jobs/{job_id}", include_in_schema=False)
async def get_job(request: Request, job_id: str) -> Response:
    return _json(job_view(await jobs_of(request).get(job_id, owner_of(request))))


@router.delete(JOBS_PATH + "/{job_id}")
@router.delete("/images/jobs/{job_id}", include_in_schema=False)
async def cancel_job(request: Request, job_id: str) -> Response:
    """Cancel a queued or running job (a running batch stops at its next step); 409 once it has ended."""
    return _json(job_view(await jobs_of(request).cancel(job_id, owner_of(request))))
