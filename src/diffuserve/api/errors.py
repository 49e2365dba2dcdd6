"""The one error mapper: every exception becomes an OpenAI error envelope with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffuserve.errors import (
    DiffuserveError,
    InvalidRequest,
    MethodNotAllowed,
    QueueFull,
    RouteNotFound,
    Unauthorized,
)

log = logging.getLogger(__name__)


def error_response(error: DiffuserveError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    headers = {}
    if isinstance(error, QueueFull):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DiffuserveError)
    async def _known(request: Request, exc: DiffuserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(RouteNotFound(f"no route {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowed(f"method {request.method} not allowed on {request.url.path}")
            )
        error = DiffuserveError(str(exc.detail))
        error.status = exc.status_code
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(InvalidRequest(f"invalid request: {first.get('msg')}", param=param))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback for the operator; the client only learns that it failed.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(DiffuserveError("internal server error"))
