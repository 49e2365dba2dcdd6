"""X-Forwarded-* headers believed only from the proxies of FORWARDED_ALLOW_IPS: from any other client they are
dropped before the app sees them, so no requester picks the scheme, host or prefix written into its links."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

# RFC 7239's Forwarded too: nothing here reads it, and nothing behind a trusted proxy should start to.
FORWARDED_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-proto",
    }
)


class TrustedForwarding:
    """uvicorn's ProxyHeadersMiddleware (X-Forwarded-For and -Proto become the request's client and scheme when
    the peer is trusted; its address list syntax: IPs, CIDR networks, `*`), preceded by the removal of every
    forwarded header an untrusted peer sent: -Host and -Prefix, which uvicorn leaves to the app, included.
    Must see the connection's own peer: uvicorn's own proxy-header handling is turned off where this runs."""

    def __init__(self, app: ASGIApp, trusted: str | list[str]) -> None:
        self.proxied = ProxyHeadersMiddleware(app, trusted_hosts=trusted)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if (client[0] if client else None) not in self.proxied.trusted_hosts:
                scope["headers"] = [item for item in scope["headers"] if item[0] not in FORWARDED_HEADERS]
        await self.proxied(scope, receive, send)  # type: ignore[arg-type]
