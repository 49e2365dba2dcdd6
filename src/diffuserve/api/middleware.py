"""Pure-ASGI middleware: request id in and out, one structured access line per request."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffuserve.api.errors import error_response
from diffuserve.errors import DiffuserveError

log = logging.getLogger("diffuserve.access")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
QUIET_PATHS = ("/health", "/v2/health", "/metrics")
# Where a route leaves the body's unknown field names (request.state.ignored_fields) for the response header.
IGNORED_FIELDS_KEY = "ignored_fields"


def ascii_header(text: str) -> str:
    """`text` as a header value: non-ASCII escaped (`\u00e9`), control characters already escaped by safe_text."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


# Key in the request's scope state of the status the request ended with, where it is not the one its answer
# began with: a stream answered 200 whose client left is counted 499, and logged so.
FINAL_STATUS_KEY = "final_status"


class RequestContextMiddleware:
    """Kept as raw ASGI (not BaseHTTPMiddleware) so it never buffers bodies or hides client disconnects."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                headers = MutableHeaders(scope=message)
                headers.append("x-request-id", request_id)
                if state.get(IGNORED_FIELDS_KEY):
                    headers.append("x-ignored-fields", state[IGNORED_FIELDS_KEY])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Answered here rather than by Starlette's outermost handler so the 500 carries the request id;
            # the traceback goes to the log only.
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if response_started:
                raise
            await error_response(DiffuserveError("internal server error"))(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            fields = {
                "request_id": request_id,
                "method": scope.get("method"),
                "path": path,
                "status": state.get(FINAL_STATUS_KEY, status),
                "total_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            for key in ("model", "n", "batch_size", "queue_ms", "inference_ms", "encode_ms"):
                if key in state:
                    fields[key] = state[key]
            level = logging.DEBUG if path.startswith(QUIET_PATHS) else logging.INFO
            log.log(level, "%s %s %s", fields["method"], path, fields["status"], extra=fields)
