"""`POST /v1/images/generations`: validate, queue, await the batch, answer JSON or raw image bytes."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Depends, Request, Response

from diffuserve.api.deps import (
    read_json_body,
    request_timeout,
    require_auth,
    service_of,
    settings_of,
    wait_for_disconnect,
    wants_json,
)
from diffuserve.api.image_data import image_data
from diffuserve.api.openapi import IMAGES_ROUTE_DOC
from diffuserve.errors import ClientClosed, DiffuserveError, InvalidRequest
from diffuserve.protocol import ImageGenerationRequest, ImagesResponse
from diffuserve.serving.service import ClientGone

router = APIRouter(dependencies=[Depends(require_auth)])


@router.post("/v1/images/generations", **IMAGES_ROUTE_DOC)
@router.post("/images/generations", include_in_schema=False)
async def create_image(request: Request) -> Response:
    settings, service, metrics = settings_of(request), service_of(request), request.app.state.metrics
    drain = request.app.state.drain
    state = request.state
    started = time.perf_counter()
    model_label = "-"

    def count(status: int) -> None:
        metrics.requests.labels(model_label, str(status)).inc()
        metrics.request_seconds.observe(time.perf_counter() - started)

    try:
        drain.refuse_if_draining()
        body = ImageGenerationRequest.parse(
            await read_json_body(request, settings.max_body_bytes, settings.body_timeout)
        )
        model = service.model_for(body.model or request.headers.get("x-model-name") or None)
        model_label = model.name
        generation = body.to_generation(
            request_id=state.request_id,
            model=model,
            max_images=settings.max_images_per_request,
            max_cost=settings.max_request_cost,
        )
        as_json = wants_json(body.response_format, request.headers)
        if not as_json and generation.n > 1:
            raise InvalidRequest(
                "n > 1 returns several images: ask for JSON with response_format 'b64_json'", param="n"
            )
        state.model, state.n = model.name, generation.n
        done = await drain.run(
            service.generate(
                generation,
                timeout=request_timeout(request, settings),
                disconnected=lambda: wait_for_disconnect(request),
            )
        )
        # Inside the try: an image store failure is counted as the status the client sees.
        data = await image_data(request, done.images, body.response_format) if as_json else []
    except DiffuserveError as exc:
        count(exc.status)
        raise
    except ClientGone:
        count(ClientClosed.status)
        raise ClientClosed("the client closed the connection before its images were ready") from None
    except Exception:
        count(500)
        raise
    count(200)
    metrics.images.labels(model_label).inc(len(done.images))
    metrics.inference_seconds.observe(done.inference_ms / 1000)
    state.batch_size, state.queue_ms, state.inference_ms, state.encode_ms = (
        done.batch_size,
        round(done.queue_ms, 1),
        round(done.inference_ms, 1),
        round(done.encode_ms, 1),
    )
    answered = time.perf_counter()
    if as_json:
        payload = ImagesResponse(
            data=data,
            model=model.name,
            output_format=generation.output_format,
            size=f"{generation.width}x{generation.height}",
        )
        # orjson: a few MB of base64 serialise in about a millisecond, several times faster than json.
        content, media_type = orjson.dumps(payload.model_dump()), "application/json"
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
        "x-model": model.name,
        "x-queue-ms": f"{done.queue_ms:.1f}",
        "x-inference-ms": f"{done.inference_ms:.1f}",
        "x-encode-ms": f"{done.encode_ms:.1f}",
        "x-batch-size": str(done.batch_size),
        "server-timing": ", ".join(f"{phase};dur={ms:.1f}" for phase, ms in phases.items())
        + f", total;dur={(time.perf_counter() - started) * 1000:.1f}",
    }
    if not as_json:
        headers["x-seed"] = str(done.images[0].seed)
    return Response(content=content, media_type=media_type, headers=headers)
