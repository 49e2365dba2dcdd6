"""The one error mapper: the project's exceptions and the router's 404/405 become OpenAI error envelopes."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from diffuserve.errors import (
    DiffuserveError,
    MethodNotAllowed,
    QueueFull,
    RouteNotFound,
    Unauthorized,
)


def error_response(error: DiffuserveError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    headers = {}
    if isinstance(error, QueueFull):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Maps this project's exceptions and the router's 404/405. Nothing else needs a handler here: no route
    declares a parameter FastAPI validates (they read their own bodies), so no RequestValidationError or
    body-parsing HTTPException is raised; any other exception is answered by RequestContextMiddleware."""

    @app.exception_handler(DiffuserveError)
    async def _known(request: Request, exc: DiffuserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(404)
    async def _no_route(request: Request, exc: Exception) -> JSONResponse:
        return error_response(RouteNotFound(f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def _wrong_method(request: Request, exc: Exception) -> JSONResponse:
        return error_response(MethodNotAllowed(f"method {request.method} not allowed on {request.url.path}"))
