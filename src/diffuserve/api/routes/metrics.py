"""`GET /metrics` in Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from diffuserve.api.deps import require_auth

router = APIRouter(dependencies=[Depends(require_auth)])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
