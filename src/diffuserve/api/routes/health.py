"""Liveness and readiness (also at KServe's /v2 paths, and readiness at vLLM's `/health`); readiness is 503 until
a worker is loaded and warm. `/version`: the server's and its libraries' versions."""

from __future__ import annotations

import contextlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from diffuserve import __version__
from diffuserve.api.deps import service_of
from diffuserve.errors import Unauthorized

router = APIRouter()


@router.get("/health/live")
@router.get("/v2/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/health/ready")
@router.get("/v2/health/ready")
@router.get("/health")
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


@router.get("/version")
async def version() -> dict[str, str]:
    """As vLLM and LocalAI answer it; the libraries read from their installed metadata, nothing imported."""
    found = {"version": __version__}
    for package in ("torch", "diffusers", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = package_version(package)
    return found


def _authorised(request: Request) -> bool:
    try:
        request.app.state.auth.check(request.headers.get("authorization"))
    except Unauthorized:
        return False
    return True
