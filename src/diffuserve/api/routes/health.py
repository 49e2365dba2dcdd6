"""Liveness and readiness (also at KServe's /v2 paths); readiness is 503 until a worker is loaded and warm."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from diffuserve.api.deps import service_of
from diffuserve.errors import Unauthorized

router = APIRouter()


@router.get("/health/live")
@router.get("/v2/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/health/ready")
@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    """Open to all, but worker PIDs are shown only to callers the API itself would let in."""
    service = service_of(request)
    draining = request.app.state.drain.draining
    workers = service.describe_workers()
    if not _authorised(request):
        workers = [
            {key: value for key, value in worker.items() if key not in ("pid", "pids")} for worker in workers
        ]
    body = {
        "status": "draining" if draining else "ready" if service.ready else "loading",
        "model": service.name,
        "models": service.describe_models(),
        "workers": workers,
    }
    if service.fatal_error:
        body["status"], body["error"] = "failed", service.fatal_error
    return JSONResponse(body, status_code=200 if service.ready and not draining else 503)


def _authorised(request: Request) -> bool:
    try:
        request.app.state.auth.check(request.headers.get("authorization"))
    except Unauthorized:
        return False
    return True
