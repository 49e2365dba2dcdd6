"""The absolute base URL a client reaches this server at, for links in answers: PUBLIC_URL when set, else the
request's X-Forwarded-Proto / -Host / -Prefix (set by a proxy in front), else its own scheme and Host."""

from __future__ import annotations

import re

from starlette.requests import Request

from diffuserve.errors import InvalidRequest
from diffuserve.logs import safe_text

# A DNS name (underscores too: container names), an IPv4 address or a bracketed IPv6 one, and a port.
HOST = re.compile(r"(?:[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
# Path segments of unreserved characters and percent escapes; no `..`, no query, no fragment.
PREFIX = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~%-]+)*/?")
MAX_PREFIX_CHARS = 256
SHOWN_CHARS = 64


def base_url(request: Request, public_url: str = "") -> str:
    """`scheme://host[:port][/prefix]`, no trailing slash. A malformed forwarded header is a 400 naming it,
    rather than a link that points nowhere; proxies chaining several values put the client's first."""
    if public_url:
        return public_url.rstrip("/")
    headers = request.headers
    proto = _first(headers.get("x-forwarded-proto"))
    if proto is None:
        scheme = request.url.scheme
    elif proto.lower() in ("http", "https"):
        scheme = proto.lower()
    else:
        raise InvalidRequest(
            f"X-Forwarded-Proto must be http or https, got {safe_text(proto, SHOWN_CHARS)!r}",
            param="X-Forwarded-Proto",
        )
    host, param = _first(headers.get("x-forwarded-host")), "X-Forwarded-Host"
    if host is None:
        host, param = headers.get("host") or request.url.netloc, "Host"
    if not HOST.fullmatch(host):
        raise InvalidRequest(
            f"{param} must be host[:port] to build image URLs, got {safe_text(host, SHOWN_CHARS)!r}",
            param=param,
        )
    prefix = _first(headers.get("x-forwarded-prefix")) or ""
    if prefix and (
        len(prefix) > MAX_PREFIX_CHARS or not prefix.startswith("/") or not PREFIX.fullmatch(prefix)
    ):
        raise InvalidRequest(
            f"X-Forwarded-Prefix must be a path like /api (letters, digits, ._~%-, at most {MAX_PREFIX_CHARS} "
            f"characters), got {safe_text(prefix, SHOWN_CHARS)!r}",
            param="X-Forwarded-Prefix",
        )
    return f"{scheme}://{host}{prefix.rstrip('/')}"


def _first(value: str | None) -> str | None:
    if value is None:
        return None
    first = value.split(",")[0].strip()
    return first or None
