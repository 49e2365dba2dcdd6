"""Small HTTP pieces: bearer auth and its owner tags, the response-format rule, image encoding, device specs, the
body budget, trusted forwarded headers, the protocol's limits."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from diffuserve.api.auth import BearerAuth
from diffuserve.api.body_budget import BODY_MEMORY_FULL, BodyBudget
from diffuserve.api.deps import wants_json
from diffuserve.api.forwarded import TrustedForwarding
from diffuserve.api.http_protocol import GuardedHttpProtocol, guarded_protocol
from diffuserve.errors import PayloadTooLarge, QueueFull, Unauthorized
from diffuserve.serving.codecs import encode_pixels
from diffuserve.serving.worker_handle import resolve_devices


def test_bearer_auth() -> None:
    auth = BearerAuth(["k1", "k2"])
    auth.check("Bearer k2")
    auth.check("bearer k1")
    for header in (None, "", "Bearer", "Bearer k3", "Basic k1", "k1"):
        with pytest.raises(Unauthorized):
            auth.check(header)
    BearerAuth([]).check(None)  # auth off


@pytest.mark.parametrize(
    ("response_format", "headers", "expected"),
    [
        ("b64_json", {"accept": "*/*"}, True),
        ("url", {"accept": "*/*"}, True),
        ("url", {"accept": "application/json", "x-stainless-raw-response": "true"}, True),
        (None, {"accept": "application/json"}, True),
        (None, {"accept": "application/json", "x-stainless-raw-response": "true"}, False),
        (None, {"accept": "*/*"}, False),
        (None, {}, False),
    ],
)
def test_response_format_rule(response_format: str | None, headers: dict, expected: bool) -> None:
    assert wants_json(response_format, headers) is expected


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_round_trip(fmt: str) -> None:
    pixels = np.full((16, 32, 3), (200, 10, 10), dtype=np.uint8)
    data = encode_pixels(pixels, fmt, compression=20)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == fmt.upper()
    assert decoded.size == (32, 16)


def test_device_specs() -> None:
    assert resolve_devices("cpu") == ["cpu"]
    assert resolve_devices("0,1") == ["cuda:0", "cuda:1"]
    assert resolve_devices("cpu,cpu") == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="gpu7"):
        resolve_devices("gpu7")


def test_owner_tags_tell_keys_apart_without_showing_them() -> None:
    auth = BearerAuth(["sk-key-one-0001", "sk-key-two-0002"])
    one, two = auth.owner_tag("Bearer sk-key-one-0001"), auth.owner_tag("bearer  sk-key-two-0002 ")
    assert re.fullmatch(r"[0-9a-f]{16}", one) and re.fullmatch(r"[0-9a-f]{16}", two) and one != two
    assert auth.owner_tag("Bearer sk-key-one-0001") == one  # the same key, the same tag, across restarts
    assert "key" not in one and BearerAuth([]).owner_tag("Bearer anything") == ""


def test_the_body_budget_refuses_what_does_not_fit_and_gives_back_what_it_held() -> None:
    budget = BodyBudget(100)
    with budget.hold(60):
        with pytest.raises(QueueFull) as full, budget.hold(50):
            pass
        assert full.value.status == 429 and full.value.retry_after == 1
        assert full.value.code == BODY_MEMORY_FULL
        with budget.hold(40):
            assert budget.held == 100
    assert budget.held == 0
    with pytest.raises(PayloadTooLarge), budget.hold(101):
        pass
    with pytest.raises(RuntimeError), budget.hold(100):
        raise RuntimeError("a request that fails gives its share back too")
    assert budget.held == 0


async def _forwarded_scope(trusted: str, client: str) -> dict:
    seen: dict = {}

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.update(scope)

    headers = [
        (b"host", b"internal:8001"),
        (b"x-forwarded-host", b"evil.example"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-prefix", b"/api"),
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"forwarded", b"host=evil.example"),
    ]
    scope = {"type": "http", "scheme": "http", "client": (client, 5000), "headers": headers}
    await TrustedForwarding(app, trusted)(scope, None, None)  # type: ignore[arg-type]
    return seen


@pytest.mark.parametrize(
    ("trusted", "client", "believed"),
    [
        ("127.0.0.1,::1", "127.0.0.1", True),
        ("127.0.0.1,::1", "127.0.0.2", False),
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "192.168.0.1", False),
        ("*", "198.51.100.1", True),
    ],
)
async def test_forwarded_headers_are_believed_only_from_trusted_proxies(
    trusted: str, client: str, believed: bool
) -> None:
    scope = await _forwarded_scope(trusted, client)
    names = {name for name, _ in scope["headers"]}
    if believed:
        assert scope["scheme"] == "https" and scope["client"] == ("203.0.113.7", 0)
        assert b"x-forwarded-host" in names and b"x-forwarded-prefix" in names
    else:
        assert scope["scheme"] == "http" and scope["client"] == (client, 5000)
        assert names == {b"host"}


def test_protocol_limits_are_class_attributes_of_a_subclass() -> None:
    counted: list[int] = []
    protocol = guarded_protocol(5.0, 6.0, 7, send_timeout=8.0, on_send_timeout=lambda: counted.append(1))
    assert issubclass(protocol, GuardedHttpProtocol) and protocol is not GuardedHttpProtocol
    assert (protocol.header_timeout, protocol.body_timeout, protocol.max_connections) == (5.0, 6.0, 7)
    assert protocol.send_timeout == 8.0 and GuardedHttpProtocol.send_timeout == 30.0
    # Kept unbound: called on a connection, the counter gets no connection as an argument.
    callback = protocol.__new__(protocol).on_send_timeout
    assert callback is not None
    callback()
    assert counted == [1]
    with pytest.raises(TypeError, match="unknown"):
        protocol.configured(send_timout=1.0)
