"""Shared request helpers for routes: auth dependency, bounded JSON body reading, deadline and disconnects."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from diffuserve.api.http_protocol import PROTOCOL_ERROR_KEY
from diffuserve.config import Settings
from diffuserve.errors import (
    ClientClosed,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from diffuserve.protocol import decode_json
from diffuserve.serving.service import GenerationService


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def service_of(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.service
    return service


async def require_auth(request: Request) -> None:
    request.app.state.auth.check(request.headers.get("authorization"))


async def read_json_body(request: Request, limit: int, timeout: float) -> Any:
    """The body as JSON, refusing non-JSON content types and bodies over `limit` bytes without reading them
    whole, and bodies not received within `timeout` seconds (408, then the connection closes)."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {content_type or 'none'!r}", param="Content-Type"
        )
    raw = await read_body(request, limit, timeout)
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object with at least `prompt`")
    return decode_json(raw)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, refusing one over `limit` bytes without reading it whole (413) and one not received
    within `timeout` seconds (408, then the connection closes)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    try:
        raw = await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body was not received within {timeout:g} s") from None
    except ClientDisconnect:
        # The HTTP parser refused the body (malformed chunked encoding …) and answered 400 itself, or the
        # client hung up mid-upload: either way the status is the one the client saw, not a server error.
        refused = request.scope.get("state", {}).get(PROTOCOL_ERROR_KEY)
        if refused:
            raise InvalidRequest(f"malformed HTTP request: {refused}") from None
        raise ClientClosed("the client closed the connection while sending its body") from None
    return raw


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def request_timeout(request: Request, settings: Settings) -> float:
    """The server's deadline, optionally shortened (never lengthened) by an `X-Request-Timeout` header in seconds."""
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return settings.request_timeout
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(
            "X-Request-Timeout must be a number of seconds", param="X-Request-Timeout"
        ) from None
    if not value > 0:
        raise InvalidRequest("X-Request-Timeout must be > 0", param="X-Request-Timeout")
    return min(value, settings.request_timeout)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up. Only valid once the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def wants_json(response_format: str | None, headers: Any) -> bool:
    """An explicit response_format wins (`b64_json` and `url` are both JSON answers); else JSON for clients
    asking for JSON, except the SDK's raw calls."""
    if response_format is not None:
        return True
    if headers.get("x-stainless-raw-response", "").lower() == "true":
        return False
    return "application/json" in headers.get("accept", "").lower()
