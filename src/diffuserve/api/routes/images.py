"""`POST /v1/images/generations` and `/v1/images/edits`: validate, queue, await the batch, answer JSON, raw image
bytes or an event stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response

from diffuserve.api.body_budget import hold_body
from diffuserve.api.decoding import decode_off_loop
from diffuserve.api.deps import (
    read_json_body,
    request_timeout,
    require_auth,
    service_of,
    settings_of,
    wait_for_disconnect,
    wants_json,
)
from diffuserve.api.edit_body import fitted_edit, read_edit_body
from diffuserve.api.http_protocol import DELIVERED_KEY
from diffuserve.api.image_data import answer_body, image_data, reserve_room
from diffuserve.api.image_store import Reservation
from diffuserve.api.middleware import FINAL_STATUS_KEY, ascii_header
from diffuserve.api.openapi import EDITS_ROUTE_DOC, IMAGES_ROUTE_DOC
from diffuserve.api.streaming import ImageStream
from diffuserve.errors import ClientClosed, DiffuserveError, InvalidRequest
from diffuserve.protocol import ImageData, ImageGenerationRequest
from diffuserve.protocol.edits import ImageEditRequest
from diffuserve.protocol.generation import describe_unknown_fields
from diffuserve.serving.service import ClientGone
from diffuserve.types import Completed, GenerationRequest, ModelInfo

router = APIRouter(dependencies=[Depends(require_auth)])


@dataclass
class Accepted:
    """A validated request, ready to queue."""

    body: ImageGenerationRequest
    model: ModelInfo
    generation: GenerationRequest


@router.post("/v1/images/generations", **IMAGES_ROUTE_DOC)
@router.post("/images/generations", include_in_schema=False)
async def create_image(request: Request) -> Response:
    async def accept(model_for: Callable[[str | None], ModelInfo]) -> Accepted:
        settings = settings_of(request)
        with hold_body(request, settings.max_body_bytes):
            body = ImageGenerationRequest.parse(
                await read_json_body(request, settings.max_body_bytes, settings.body_timeout)
            )
        model = model_for(body.model)
        generation = body.to_generation(
            request_id=request.state.request_id,
            model=model,
            max_images=settings.max_images_per_request,
            max_cost=settings.max_request_cost,
        )
        return Accepted(body, model, generation)

    return await _answer(request, "image_generation", accept)


@router.post("/v1/images/edits", **EDITS_ROUTE_DOC)
@router.post("/images/edits", include_in_schema=False)
async def edit_image(request: Request) -> Response:
    async def accept(model_for: Callable[[str | None], ModelInfo]) -> Accepted:
        settings = settings_of(request)
        # The body's bytes count against the server's budget until its pictures are decoded and fitted.
        with hold_body(request, settings.max_upload_bytes):
            received = await read_edit_body(request, settings.max_upload_bytes, settings.body_timeout)
            body = (ImageEditRequest.parse_form if received.form else ImageEditRequest.parse)(received.fields)
            assert isinstance(body, ImageEditRequest)
            model = model_for(body.model)

            def decode_and_fit(stop: threading.Event) -> GenerationRequest:
                return fitted_edit(
                    body,
                    received,
                    request_id=request.state.request_id,
                    model=model,
                    settings=settings,
                    stop=stop,
                )

            generation = await decode_off_loop(request, decode_and_fit, request_timeout(request, settings))
            return Accepted(body, model, generation)

    return await _answer(request, "image_edit", accept)


async def _answer(request: Request, kind: str, accept: Callable[..., Awaitable[Accepted]]) -> Response:
    """What both routes share: validation errors and metrics, the queue, then a plain or a streamed answer.
    `kind` is OpenAI's name for the operation in stream events (image_generation, image_edit)."""
    settings, service, metrics = settings_of(request), service_of(request), request.app.state.metrics
    drain = request.app.state.drain
    started = time.perf_counter()
    model_label = "-"
    reservation: Reservation | None = None

    def count(status: int) -> None:
        metrics.requests.labels(model_label, str(status)).inc()
        metrics.request_seconds.observe(time.perf_counter() - started)

    def model_for(requested: str | None) -> ModelInfo:
        nonlocal model_label
        model = service.model_for(requested or request.headers.get("x-model-name") or None)
        model_label = model.name
        return model

    try:
        drain.refuse_if_draining()
        accepted = await accept(model_for)
        if accepted.body.model_extra:  # a misspelt field must not pass unnoticed: named in a header too
            request.state.ignored_fields = ascii_header(
                describe_unknown_fields(list(accepted.body.model_extra))
            )
        generation = accepted.generation
        generation.loras = await service.resolve_adapters(accepted.model, accepted.body.adapters)
        for use in generation.loras:
            metrics.adapter_requests.labels(model_label, use.name).inc()
        streamed = bool(accepted.body.stream)
        as_json = streamed or wants_json(accepted.body.response_format, request.headers)
        if not as_json and generation.n > 1:
            raise InvalidRequest(
                "n > 1 returns several images: ask for JSON with response_format 'b64_json'", param="n"
            )
        request.state.model, request.state.n = model_label, generation.n
        # One deadline for the whole request: an edit's decoding has already spent part of it.
        timeout = max(0.001, request_timeout(request, settings) - (time.perf_counter() - started))
        if streamed:
            return _stream(
                request, kind, accepted, timeout, lambda done, status: _finish(request, done, status, count)
            )
        if accepted.body.response_format == "url":
            # Room in the image store first: a full store refuses the answer before it is generated.
            reservation = await reserve_room(request, generation)
        done = await drain.run(
            service.generate(generation, timeout=timeout, disconnected=lambda: wait_for_disconnect(request))
        )
        # Inside the try: an image store failure is counted as the status the client sees.
        data = (
            await image_data(request, done.images, accepted.body.response_format, reservation)
            if as_json
            else None
        )
    except DiffuserveError as exc:
        count(exc.status)
        raise
    except ClientGone:
        count(ClientClosed.status)
        raise ClientClosed("the client closed the connection before its images were ready") from None
    except Exception:
        count(500)
        raise
    finally:
        if reservation is not None:
            reservation.release()  # a no-op once the images took its room
    _finish(request, done, 200, count)
    return _response(request, accepted, done, data, started)


def _stream(
    request: Request,
    kind: str,
    accepted: Accepted,
    timeout: float,
    finished: Callable[[Completed | None, int], None],
) -> Response:
    service, drain = service_of(request), request.app.state.drain
    stream = ImageStream(
        kind=kind,
        body=accepted.body,
        generation=accepted.generation,
        model=accepted.model,
        finished=finished,
        delivered=request.scope["state"].get(DELIVERED_KEY),
    )
    # Queued now, so a full queue is still a 429 answer rather than an error event.
    progress = accepted.generation.report_progress
    pendings = service.submit(
        accepted.generation, stream.on_partial, stream.on_progress if progress else None
    )
    if progress:
        stream.position = lambda: service.queue_position(pendings)
    work = asyncio.ensure_future(
        drain.run(service.wait(pendings, timeout=timeout, disconnected=lambda: wait_for_disconnect(request)))
    )
    return stream.response(work)


def _finish(request: Request, done: Completed | None, status: int, count: Callable[[int], None]) -> None:
    count(status)
    request.scope["state"][FINAL_STATUS_KEY] = status  # the access log's status: a stream's may not be 200
    if done is None:
        return
    metrics, state = request.app.state.metrics, request.state
    metrics.images.labels(state.model).inc(len(done.images))
    metrics.inference_seconds.observe(done.inference_ms / 1000)
    state.batch_size, state.queue_ms, state.inference_ms, state.encode_ms = (
        done.batch_size,
        round(done.queue_ms, 1),
        round(done.inference_ms, 1),
        round(done.encode_ms, 1),
    )


def _response(
    request: Request, accepted: Accepted, done: Completed, data: list[ImageData] | None, started: float
) -> Response:
    """JSON with `data` when there is some, else the first image's bytes; timing headers either way."""
    metrics, generation, body = request.app.state.metrics, accepted.generation, accepted.body
    answered = time.perf_counter()
    if data is not None:
        content = answer_body(accepted.model, generation, body.quality, data, done.text_tokens)
        media_type = "application/json"
    else:
        content, media_type = done.images[0].data, done.images[0].media_type
    phases = {
        "queue": done.queue_ms,
        "denoise": done.denoise_ms,
        "decode": done.decode_ms,
        "encode": done.encode_ms,
        "transfer": done.transfer_ms,
        "respond": (time.perf_counter() - answered) * 1000,
    }
    for phase, ms in phases.items():
        metrics.phase_seconds.labels(phase).observe(ms / 1000)
    headers = {
        "x-model": accepted.model.name,
        "x-queue-ms": f"{done.queue_ms:.1f}",
        "x-inference-ms": f"{done.inference_ms:.1f}",
        "x-encode-ms": f"{done.encode_ms:.1f}",
        "x-batch-size": str(done.batch_size),
        "server-timing": ", ".join(f"{phase};dur={ms:.1f}" for phase, ms in phases.items())
        + f", total;dur={(time.perf_counter() - started) * 1000:.1f}",
    }
    if data is None:
        headers["x-seed"] = str(done.images[0].seed)
    return Response(content=content, media_type=media_type, headers=headers)
