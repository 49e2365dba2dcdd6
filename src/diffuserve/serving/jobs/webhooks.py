"""Webhooks in the Standard Webhooks format: HMAC-SHA256 signatures, delivery to vetted public addresses only
(unless allowed), retried with backoff."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from diffuserve.errors import InvalidRequest
from diffuserve.job_settings import webhook_key

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
MAX_BACKOFF_S = 300.0


class WebhookRefused(Exception):
    """The webhook's address is not one this server may call."""


class Unresolved(Exception):
    """The webhook's host name did not resolve (perhaps for a moment: worth another attempt)."""


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: v1, then the base64 HMAC-SHA256 of `id.timestamp.body`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def check_url(url: str, allow_private: bool) -> None:
    """A webhook URL a client may give: http(s), a host, no credentials, and (unless allowed) not a literal
    loopback, private, link-local or otherwise non-public address. InvalidRequest naming webhook_url."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest(f"webhook_url is longer than {MAX_URL_CHARS} characters", param="webhook_url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(
            "webhook_url must be an http:// or https:// URL with a host", param="webhook_url"
        )
    if parts.username or parts.password:
        raise InvalidRequest("webhook_url must not carry credentials", param="webhook_url")
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise InvalidRequest("webhook_url has a malformed port", param="webhook_url") from None
    address = literal_address(parts.hostname)
    if address is None:
        if not allow_private and parts.hostname.lower().rstrip(".") in ("localhost", "localhost.localdomain"):
            raise InvalidRequest(_private_message(parts.hostname), param="webhook_url")
        return  # a name: checked again, resolved, when the webhook is sent
    if not allow_private and not is_public(address):
        raise InvalidRequest(_private_message(parts.hostname), param="webhook_url")


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host spells, in any form the resolver takes as one (`127.1`, `0x7f.1`, `2130706433`)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global, and so is any IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64 64:ff9b::/96)."""
    if not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
        if address in NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(inner is None or inner.is_global for inner in embedded)
    return True


def _private_message(host: str) -> str:
    return (
        f"webhook_url's host {host} is a loopback, private or otherwise non-public address; this server "
        "sends webhooks there only with WEBHOOK_ALLOW_PRIVATE=true"
    )


def resolve_public(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to: every address the name resolves to must be public (unless allowed), so a
    name that points inward is refused; the connection then goes to the address checked, not a fresh lookup."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Unresolved(f"cannot resolve {host}: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise WebhookRefused(f"{host} has no address")
    if not allow_private:
        inward = [a for a in addresses if not is_public(ipaddress.ip_address(a.split("%")[0]))]
        if inward:
            raise WebhookRefused(f"{host} resolves to a non-public address ({inward[0]})")
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the certificate still checked against the URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


@dataclass
class Delivery:
    """What one attempt gave: the receiver's status (None when it could not be reached) and why it failed."""

    status: int | None
    problem: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retry(self) -> bool:
        """Worth another attempt: the receiver failed or could not be reached; 4xx other than 408/429 and a
        refused address are final (Standard Webhooks: 410 Gone means stop)."""
        if self.status is None:
            return not self.problem.startswith("refused")
        return self.status >= 500 or self.status in (408, 429)


class WebhookSender:
    """Signs and posts one payload; `send` blocks (run it in a thread)."""

    def __init__(self, secret: str, *, allow_private: bool, timeout: float) -> None:
        self.key = webhook_key(secret)
        self.allow_private = allow_private
        self.timeout = timeout

    def headers(self, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        stamp = int(time.time()) if timestamp is None else timestamp
        return {
            "content-type": "application/json",
            "user-agent": "diffuserve-webhooks",
            "webhook-id": message_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(self.key, message_id, stamp, body),
        }

    def send(self, url: str, message_id: str, body: bytes) -> Delivery:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            address = resolve_public(host, port, self.allow_private)
        except WebhookRefused as exc:
            return Delivery(None, f"refused: {exc}")
        except Unresolved as exc:
            return Delivery(None, str(exc))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection: http.client.HTTPConnection = (
            _PinnedHTTPS(host, address, port, self.timeout)
            if parts.scheme == "https"
            else http.client.HTTPConnection(address, port, timeout=self.timeout)
        )
        headers = self.headers(message_id, body)
        headers["host"] = parts.netloc.rsplit("@", 1)[-1]
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read(65536)  # the receiver's answer is not used; a bounded read lets it finish cleanly
            return Delivery(response.status, "" if response.status < 300 else f"HTTP {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            return Delivery(None, f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()


def backoff_s(attempt: int, first_s: float) -> float:
    """Seconds before attempt `attempt + 1` (attempt counts from 1): first_s, doubled each time, capped."""
    return min(MAX_BACKOFF_S, first_s * 2 ** (attempt - 1))
