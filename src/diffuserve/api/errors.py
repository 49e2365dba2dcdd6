"""The one error mapper: the project's exceptions and the router's 404/405 become OpenAI error envelopes."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from diffuserve.errors import (
    DiffuserveError,
    MethodNotAllowed,
    QueueFull,
    RequestTimeout,
    RouteNotFound,
    ShuttingDown,
    Unauthorized,
)


def error_body(error: DiffuserveError) -> dict[str, dict[str, str | None]]:
    return error.envelope()


def error_response(error: DiffuserveError, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if isinstance(error, QueueFull):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, RequestTimeout):
        # The rest of a body that came too slowly may still arrive: the connection cannot be reused.
        headers["Connection"] = "close"
    if isinstance(error, ShuttingDown):
        headers["Connection"] = "close"
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


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
        # The router puts the route's methods in an Allow header (RFC 9110 requires one on 405).
        allow = (getattr(exc, "headers", None) or {}).get("Allow")
        return error_response(
            MethodNotAllowed(f"method {request.method} not allowed on {request.url.path}"),
            headers={"Allow": allow} if allow else None,
        )

    @app.exception_handler(HTTPException)
    async def _other_http(request: Request, exc: HTTPException) -> JSONResponse:
        # Any other status the framework raises itself, in the same envelope.
        error = DiffuserveError(str(exc.detail))
        error.status = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(error, headers=dict(exc.headers or {}))
