"""Small HTTP pieces: bearer auth, the response-format rule, image encoding, device specs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffuserve.api.auth import BearerAuth
from diffuserve.api.deps import wants_json
from diffuserve.errors import Unauthorized
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
