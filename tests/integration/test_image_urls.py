"""response_format "url" with the official openai SDK against real servers: the URLs download the very bytes of
the b64_json answer, need the API key, follow forwarded headers and answer 404 once expired."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.helpers import ServerHandle, start_server

KEY = "sk-url-test-key-0001"
TTL_S = 2.0


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, Path]]:
    store = tmp_path_factory.mktemp("images")
    with start_server(API_KEYS=KEY, IMAGE_STORE_DIR=str(store), MODEL_BATCH="4") as handle:
        yield handle, store


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _envelope(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def test_sdk_urls_download_the_bytes_of_the_b64_answer(keyed: tuple[ServerHandle, Path]) -> None:
    server, store = keyed
    client = OpenAI(api_key=KEY, base_url=f"{server.base_url}/v1", max_retries=0)
    model = server.model_name()
    extra = {"seed": 21, "output_format": "png"}
    by_url = client.images.generate(
        model=model, prompt="the digit 5", n=2, response_format="url", extra_body=extra
    )
    by_b64 = client.images.generate(
        model=model, prompt="the digit 5", n=2, response_format="b64_json", extra_body=extra
    )
    assert len(by_url.data) == len(by_b64.data) == 2
    for url_item, b64_item in zip(by_url.data, by_b64.data, strict=True):
        assert url_item.b64_json is None and b64_item.url is None
        assert url_item.url and url_item.url.startswith(f"{server.base_url}/v1/images/")
        assert url_item.url.endswith("/content")
        download = httpx.get(url_item.url, headers=_auth(), timeout=10)
        assert download.status_code == 200, download.text
        assert download.headers["content-type"] == "image/png"
        assert download.headers["cache-control"].startswith("private, max-age=")
        assert download.content == base64.b64decode(b64_item.b64_json or "")
    assert [item.model_dump()["seed"] for item in by_url.data] == [21, 22]
    # One file per image in the configured folder, named by its id, readable by the server's user only.
    ids = {item.url.split("/")[-2] for item in by_url.data if item.url}
    files = {path.name: path for path in store.iterdir()}
    assert {f"{image_id}.png" for image_id in ids} <= set(files)
    assert all(path.stat().st_mode & 0o077 == 0 for path in files.values())


def test_url_answers_leave_b64_json_out_of_the_json(keyed: tuple[ServerHandle, Path]) -> None:
    server, _ = keyed
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"prompt": "the digit 2", "seed": 3, "response_format": "url"},
        # The SDK's raw-response marker would mean image bytes without response_format: url means JSON.
        headers={**_auth(), "Accept": "*/*", "x-stainless-raw-response": "true"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    [item] = response.json()["data"]
    assert set(item) == {"url", "seed", "revised_prompt"}


def test_the_content_route_needs_the_api_key(keyed: tuple[ServerHandle, Path]) -> None:
    server, _ = keyed
    client = OpenAI(api_key=KEY, base_url=f"{server.base_url}/v1", max_retries=0)
    url = (
        client.images.generate(prompt="the digit 9", response_format="url", extra_body={"seed": 4})
        .data[0]
        .url
    )
    assert url
    missing = httpx.get(url, timeout=10)
    _envelope(missing, 401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    _envelope(httpx.get(url, headers=_auth("sk-wrong-key-0000"), timeout=10), 401, "invalid_api_key")
    assert httpx.get(url, headers=_auth(), timeout=10).status_code == 200
    # Auth comes first: without a key even an unknown id answers 401, so ids cannot be probed.
    _envelope(
        httpx.get(f"{server.base_url}/v1/images/{'A' * 32}/content", timeout=10), 401, "invalid_api_key"
    )


def test_forwarded_headers_make_the_url_point_at_the_proxy(keyed: tuple[ServerHandle, Path]) -> None:
    server, _ = keyed
    forwarded = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "images.example.test",
        "X-Forwarded-Prefix": "/api",
    }
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"prompt": "the digit 1", "response_format": "url"},
        headers={**_auth(), **forwarded},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith("https://images.example.test/api/v1/images/"), url
    # The same path, taken off the proxy's prefix, is what the server itself serves.
    path = url.removeprefix("https://images.example.test/api")
    assert httpx.get(f"{server.base_url}{path}", headers=_auth(), timeout=10).status_code == 200


def test_a_malformed_forwarded_host_is_a_400_naming_it(keyed: tuple[ServerHandle, Path]) -> None:
    server, _ = keyed
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"prompt": "the digit 1", "response_format": "url"},
        headers={**_auth(), "X-Forwarded-Host": "evil.test/steal?x="},
        timeout=60,
    )
    assert _envelope(response, 400, "invalid_value")["param"] == "X-Forwarded-Host"


def test_urls_answer_404_after_their_ttl(tmp_path: Path) -> None:
    with start_server(IMAGE_STORE_DIR=str(tmp_path), IMAGE_URL_TTL_SECONDS=str(TTL_S)) as server:
        client = OpenAI(api_key="unused", base_url=f"{server.base_url}/v1", max_retries=0)
        url = client.images.generate(prompt="the digit 0", response_format="url").data[0].url
        assert url
        image_id = url.split("/")[-2]
        assert [path.name for path in tmp_path.iterdir()] == [f"{image_id}.webp"]
        time.sleep(TTL_S + 0.5)
        error = _envelope(httpx.get(url, timeout=10), 404, "image_not_found")
        assert error["param"] == "image_id" and image_id in error["message"]
        assert not list(tmp_path.iterdir())  # the expired file is gone too
        assert httpx.get(f"{server.base_url}/health/ready", timeout=10).status_code == 200
