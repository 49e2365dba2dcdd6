"""Liveness and readiness (also at KServe's /v2 paths); readiness is 503 until a worker is loaded and warm."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from diffuserve.api.deps import service_of

router = APIRouter()


@router.get("/health/live")
@router.get("/v2/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/health/ready")
@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    service = service_of(request)
    body = {
        "status": "ready" if service.ready else "loading",
        "model": service.name,
        "workers": service.pool.describe(),
    }
    if service.fatal_error:
        body["status"], body["error"] = "failed", service.fatal_error
    return JSONResponse(body, status_code=200 if service.ready else 503)
