"""uvicorn's httptools protocol with deadlines for slow clients (sending or reading), a connection cap with room
kept for health probes, and JSON protocol errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from diffuserve.api.send_deadline import SendWatch

# Key in the request's scope state set when the parser refused the request mid-body (malformed chunked
# encoding …): the handler, which only sees a disconnect, then counts the 400 the client was sent.
PROTOCOL_ERROR_KEY = "protocol_error"
# Key in the request's scope state of an awaitable callable: whether every byte sent so far reached the client
# (True) or the client went first (False). uvicorn silently drops what is sent after a client is gone, and a
# response it takes into its buffers may still never reach the client: a streamed answer asks here before it
# counts itself delivered.
DELIVERED_KEY = "delivered"
# The connection closes this long after the body deadline when the handler has not answered by then
# (it answers 408 itself at the deadline; this catches a route that never reads its body).
BODY_CLOSE_GRACE_S = 1.0

REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}
# Connections admitted beyond the cap for health probes only, so an operator can always see the server; any
# other request on one of them is answered 503, and each closes after its answer.
PROBE_CONNECTIONS = 2
PROBE_PATHS = frozenset({b"/health/live", b"/health/ready", b"/v2/health/live", b"/v2/health/ready"})
BUSY_MESSAGE = "too many open connections; retry shortly"


def protocol_error_bytes(status: int, message: str, code: str, extra_headers: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response carrying an OpenAI error envelope, for errors raised below the app."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n"
        % (status, REASONS[status], len(body), extra_headers)
    ) + body


async def answer_busy(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI answer to a request other than a health probe on a connection kept for probes."""
    body = json.dumps(
        {
            "error": {
                "message": BUSY_MESSAGE,
                "type": "server_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardedHttpProtocol(HttpToolsProtocol):
    """Per connection: headers must arrive within `header_timeout` s of the connection opening (or of the
    request's first byte on a kept-alive connection); a body that is not complete `body_timeout` s after its
    headers (plus a grace for the handler's own 408) closes the connection; a client that accepts no byte of
    what it is sent for `send_timeout` s is cut off (`on_send_timeout` counts it). Beyond `max_connections` open
    connections, PROBE_CONNECTIONS more are admitted for health probes only; past those a new one is answered
    503 and closed at once, so slow clients cannot exhaust descriptors nor hide the server from its probes."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    send_timeout: float = 30.0
    on_send_timeout: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._send_watch: SendWatch | None = None
        self._probes_only = False

    @classmethod
    def configured(cls, **limits: Any) -> type[GuardedHttpProtocol]:
        """This class with some of its limits (the class attributes above) replaced."""
        unknown = set(limits) - set(GuardedHttpProtocol.__annotations__)
        if unknown:
            raise TypeError(f"unknown protocol limits: {sorted(unknown)}")
        if limits.get("on_send_timeout") is not None:
            # A plain function as a class attribute would be bound to each connection: keep it unbound.
            limits["on_send_timeout"] = staticmethod(limits["on_send_timeout"])
        return type(cls.__name__, (cls,), limits)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._send_watch = SendWatch(transport, self.send_timeout, self.on_send_timeout, self.logger)
        if len(self.connections) > self.max_connections + PROBE_CONNECTIONS:
            self.logger.warning("connection limit of %d reached: refusing a connection", self.max_connections)
            transport.write(
                protocol_error_bytes(503, BUSY_MESSAGE, "too_many_connections", b"retry-after: 1\r\n")
            )
            transport.close()
            return
        self._probes_only = len(self.connections) > self.max_connections
        self._arm(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._send_watch is not None:
            self._send_watch.connection_lost()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm(self.header_timeout, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        if not self._probes_only:
            super().on_headers_complete()
        else:
            # uvicorn starts the request with `self.app`: a probe-only connection gets the app for a health
            # path and the 503 answer for any other, and closes after either.
            app = self.app
            if self.url.split(b"?", 1)[0] not in PROBE_PATHS:
                self.app = answer_busy
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            if self.cycle is not None:
                self.cycle.keep_alive = False
        if self.cycle is not None and self.cycle.scope is self.scope and self._send_watch is not None:
            self.scope["state"][DELIVERED_KEY] = self._send_watch.delivered
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

    # Writes: asyncio pauses the protocol when its buffer passes the high-water mark and uvicorn then holds
    # the response until it resumes; a client that stops reading would hold it (and its connection) forever.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_watch is not None:
            self._send_watch.start()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_watch is not None:
            self._send_watch.stop()

    def on_response_complete(self) -> None:
        # The end of a response may still be queued (in asyncio's buffer or the kernel's, on a connection kept
        # alive or closing, which waits until it is written): it gets the same deadline.
        if self._send_watch is not None and self._send_watch.unsent():
            self._send_watch.start()
        super().on_response_complete()

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def guarded_protocol(
    header_timeout: float, body_timeout: float, max_connections: int, **limits: Any
) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, carrying the server's limits (`limits`: any
    other class attribute of GuardedHttpProtocol, e.g. send_timeout)."""
    return GuardedHttpProtocol.configured(
        header_timeout=header_timeout, body_timeout=body_timeout, max_connections=max_connections, **limits
    )
