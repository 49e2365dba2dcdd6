"""uvicorn's httptools protocol with deadlines for slow clients, a connection cap, and JSON protocol errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Key in the request's scope state set when the parser refused the request mid-body (malformed chunked
# encoding …): the handler, which only sees a disconnect, then counts the 400 the client was sent.
PROTOCOL_ERROR_KEY = "protocol_error"
# The connection closes this long after the body deadline when the handler has not answered by then
# (it answers 408 itself at the deadline; this catches a route that never reads its body).
BODY_CLOSE_GRACE_S = 1.0

REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def protocol_error_bytes(status: int, message: str, code: str, extra_headers: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response carrying an OpenAI error envelope, for errors raised below the app."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n"
        % (status, REASONS[status], len(body), extra_headers)
    ) + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """Per connection: headers must arrive within `header_timeout` s of the connection opening (or of the
    request's first byte on a kept-alive connection); a body that is not complete `body_timeout` s after its
    headers (plus a grace for the handler's own 408) closes the connection; beyond `max_connections` open
    connections a new one is answered 503 and closed at once, so slow clients cannot exhaust descriptors."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("connection limit of %d reached: refusing a connection", self.max_connections)
            transport.write(
                protocol_error_bytes(
                    503,
                    "too many open connections; retry shortly",
                    "too_many_connections",
                    b"retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        self._arm(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm(self.header_timeout, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout + BODY_CLOSE_GRACE_S, self._body_too_slow)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope["state"][PROTOCOL_ERROR_KEY] = msg
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        self.transport.write(protocol_error_bytes(400, msg, "invalid_http_request"))
        self.transport.close()

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # the headers did arrive; the request is the handler's now
        self.logger.info("closing a connection whose request headers took over %g s", self.header_timeout)
        self.transport.write(
            protocol_error_bytes(
                408, f"request headers not received within {self.header_timeout:g} s", "request_timeout"
            )
        )
        self.transport.close()

    def _body_too_slow(self) -> None:
        self._deadline = None
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            return  # the handler is answering (its own 408, or a response that needs no body)
        self.logger.info("closing a connection whose request body took over %g s", self.body_timeout)
        self.transport.close()

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def guarded_protocol(
    header_timeout: float, body_timeout: float, max_connections: int
) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, carrying the server's limits."""
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections},
    )
