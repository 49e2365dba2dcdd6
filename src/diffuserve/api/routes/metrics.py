"""`GET /metrics` in Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from diffuserve.api.deps import require_auth

router = APIRouter(dependencies=[Depends(require_auth)])


# The response class only documents the media type (Prometheus' text format) in the OpenAPI document.
@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
