"""Absolute image URLs: PUBLIC_URL, else X-Forwarded-Proto/-Host/-Prefix, else the request's Host header."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from diffuserve.api.public_url import base_url
from diffuserve.config import Settings
from diffuserve.errors import InvalidRequest


def request(headers: dict[str, str], scheme: str = "http") -> Request:
    return Request(
        {
            "type": "http",
            "method": "POST",
            "scheme": scheme,
            "server": ("127.0.0.1", 8001),
            "path": "/v1/images/generations",
            "root_path": "",
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Host": "127.0.0.1:8001"}, "http://127.0.0.1:8001"),
        ({}, "http://127.0.0.1:8001"),  # HTTP/1.0 without Host: the address the server listens on
        ({"Host": "[::1]:8000"}, "http://[::1]:8000"),
        ({"Host": "a:1", "X-Forwarded-Proto": "https"}, "https://a:1"),
        ({"Host": "a:1", "X-Forwarded-Proto": "HTTPS, http"}, "https://a:1"),
        ({"Host": "internal:8001", "X-Forwarded-Host": "images.example.com"}, "http://images.example.com"),
        ({"Host": "i", "X-Forwarded-Host": "edge.example:8443, nginx:8000"}, "http://edge.example:8443"),
        (
            {
                "Host": "i",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "ex.com",
                "X-Forwarded-Prefix": "/api/",
            },
            "https://ex.com/api",
        ),
        ({"Host": "i", "X-Forwarded-Prefix": "/"}, "http://i"),
        ({"Host": "my_service:8000"}, "http://my_service:8000"),
    ],
)
def test_base_url_from_the_request(headers: dict[str, str], expected: str) -> None:
    assert base_url(request(headers)) == expected


def test_public_url_wins_over_every_header() -> None:
    headers = {"Host": "i", "X-Forwarded-Host": "other", "X-Forwarded-Proto": "http"}
    assert base_url(request(headers), "https://images.example.com/diffuserve") == (
        "https://images.example.com/diffuserve"
    )


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"Host": "a", "X-Forwarded-Proto": "javascript"}, "X-Forwarded-Proto"),
        ({"Host": "a", "X-Forwarded-Host": "evil.com/path"}, "X-Forwarded-Host"),
        ({"Host": "a", "X-Forwarded-Host": "user@evil.com"}, "X-Forwarded-Host"),
        ({"Host": "a", "X-Forwarded-Host": "h" * 300}, "X-Forwarded-Host"),
        ({"Host": "a b"}, "Host"),
        ({"Host": "a", "X-Forwarded-Prefix": "api"}, "X-Forwarded-Prefix"),
        ({"Host": "a", "X-Forwarded-Prefix": "/../admin"}, "X-Forwarded-Prefix"),
        ({"Host": "a", "X-Forwarded-Prefix": "/a?b=1"}, "X-Forwarded-Prefix"),
        ({"Host": "a", "X-Forwarded-Prefix": "//evil.com"}, "X-Forwarded-Prefix"),
        ({"Host": "a", "X-Forwarded-Prefix": "/" + "p" * 300}, "X-Forwarded-Prefix"),
    ],
)
def test_malformed_forwarded_headers_are_400_naming_the_header(headers: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        base_url(request(headers))
    assert refused.value.param == param and refused.value.status == 400


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ""),
        ("https://ex.com/", "https://ex.com"),
        ("http://10.0.0.1:8000/api/", "http://10.0.0.1:8000/api"),
    ],
)
def test_public_url_setting_is_normalised(value: str, expected: str) -> None:
    assert Settings.from_env({"PUBLIC_URL": value}).public_url == expected


@pytest.mark.parametrize(
    "value", ["ex.com", "ftp://ex.com", "https://", "https://ex.com/?a=1", "https://ex.com/#x"]
)
def test_a_bad_public_url_stops_start_up_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match=r"PUBLIC_URL \(--public-url\)"):
        Settings.from_env({"PUBLIC_URL": value})


def test_image_store_settings_defaults() -> None:
    settings = Settings.from_env({"HF_HOME": "/data/hf", "PORT": "8123"})
    # One folder per port: two servers sharing a cache keep their images apart.
    assert settings.resolved_image_store_dir == "/data/hf/diffuserve/images/port-8123"
    assert settings.image_store_max_bytes == 1 << 30
    assert settings.image_url_ttl_seconds == 3600
    assert Settings.from_env({"IMAGE_STORE_DIR": "/srv/img"}).resolved_image_store_dir == "/srv/img"
