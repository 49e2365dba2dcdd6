"""response_format "url" with the official openai SDK against the app in process (its worker the stand-in engine):
the URLs download the very bytes of the b64_json answer, need the API key, follow forwarded headers and answer
404 once expired."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests import fakes
from tests.inprocess import BASE_URL, URL, client_of, sdk_of, served, settings

KEY = "sk-url-test-key-0001"
TTL_S = 2.0
ON_KEYED_LOOP = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FastAPI, Path]]:
    store = tmp_path_factory.mktemp("images")
    app_settings = settings(api_keys=[KEY], image_store_dir=str(store), model_batch=4, max_body_bytes=1 << 20)
    async with served(app_settings, fakes.FakeEngine) as app:
        yield app, store


@pytest_asyncio.fixture(loop_scope="module")
async def client(keyed: tuple[FastAPI, Path]) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(keyed[0], timeout=30) as client:
        yield client


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _envelope(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return dict(error)


@ON_KEYED_LOOP
async def test_sdk_urls_download_the_bytes_of_the_b64_answer(
    keyed: tuple[FastAPI, Path], client: httpx.AsyncClient
) -> None:
    app, store = keyed
    model = app.state.service.name
    extra = {"seed": 21, "output_format": "png"}
    async with sdk_of(app, api_key=KEY) as sdk:
        by_url = await sdk.images.generate(
            model=model, prompt="the digit 5", n=2, response_format="url", extra_body=extra
        )
        by_b64 = await sdk.images.generate(
            model=model, prompt="the digit 5", n=2, response_format="b64_json", extra_body=extra
        )
    assert by_url.data is not None and by_b64.data is not None
    assert len(by_url.data) == len(by_b64.data) == 2
    for url_item, b64_item in zip(by_url.data, by_b64.data, strict=True):
        assert url_item.b64_json is None and b64_item.url is None
        assert url_item.url and url_item.url.startswith(f"{BASE_URL}/v1/images/")
        assert url_item.url.endswith("/content")
        download = await client.get(url_item.url, headers=_auth())
        assert download.status_code == 200, download.text
        assert download.headers["content-type"] == "image/png"
        assert download.headers["cache-control"].startswith("private, max-age=")
        assert download.content == base64.b64decode(b64_item.b64_json or "")
    assert [item.model_dump()["seed"] for item in by_url.data] == [21, 22]
    # One file per image in the configured folder, named by its id (and a tag of the key that made it),
    # readable by the server's user only.
    ids = {item.url.split("/")[-2] for item in by_url.data if item.url}
    files = {path.name: path for path in store.iterdir()}
    assert ids <= {name.split(".")[0] for name in files}
    assert all(name.endswith(".png") for name in files)
    assert all(path.stat().st_mode & 0o077 == 0 for path in files.values())


@ON_KEYED_LOOP
async def test_url_answers_leave_b64_json_out_of_the_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        URL,
        json={"prompt": "the digit 2", "seed": 3, "response_format": "url"},
        # The SDK's raw-response marker would mean image bytes without response_format: url means JSON.
        headers={**_auth(), "Accept": "*/*", "x-stainless-raw-response": "true"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    [item] = response.json()["data"]
    assert set(item) == {"url", "seed", "revised_prompt"}


@ON_KEYED_LOOP
async def test_the_content_route_needs_the_api_key(
    keyed: tuple[FastAPI, Path], client: httpx.AsyncClient
) -> None:
    async with sdk_of(keyed[0], api_key=KEY) as sdk:
        answer = await sdk.images.generate(
            prompt="the digit 9", response_format="url", extra_body={"seed": 4}
        )
    assert answer.data is not None
    url = answer.data[0].url
    assert url
    missing = await client.get(url)
    _envelope(missing, 401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    _envelope(await client.get(url, headers=_auth("sk-wrong-key-0000")), 401, "invalid_api_key")
    assert (await client.get(url, headers=_auth())).status_code == 200
    # Auth comes first: without a key even an unknown id answers 401, so ids cannot be probed.
    _envelope(await client.get(f"/v1/images/{'A' * 32}/content"), 401, "invalid_api_key")


@ON_KEYED_LOOP
async def test_forwarded_headers_make_the_url_point_at_the_proxy(client: httpx.AsyncClient) -> None:
    forwarded = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "images.example.test",
        "X-Forwarded-Prefix": "/api",
    }
    response = await client.post(
        URL,
        json={"prompt": "the digit 1", "response_format": "url"},
        headers={**_auth(), **forwarded},
    )
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith("https://images.example.test/api/v1/images/"), url
    # The same path, taken off the proxy's prefix, is what the server itself serves.
    path = url.removeprefix("https://images.example.test/api")
    assert (await client.get(path, headers=_auth())).status_code == 200


@ON_KEYED_LOOP
async def test_a_malformed_forwarded_host_is_a_400_naming_it(client: httpx.AsyncClient) -> None:
    response = await client.post(
        URL,
        json={"prompt": "the digit 1", "response_format": "url"},
        headers={**_auth(), "X-Forwarded-Host": "evil.test/steal?x="},
    )
    assert _envelope(response, 400, "invalid_value")["param"] == "X-Forwarded-Host"


async def test_urls_answer_404_after_their_ttl(tmp_path: Path) -> None:
    app_settings = settings(image_store_dir=str(tmp_path), image_url_ttl_seconds=TTL_S)
    async with served(app_settings, fakes.FakeEngine) as app, client_of(app) as client, sdk_of(app) as sdk:
        answer = await sdk.images.generate(prompt="the digit 0", response_format="url")
        assert answer.data is not None
        url = answer.data[0].url
        assert url
        image_id = url.split("/")[-2]
        assert [path.name for path in tmp_path.iterdir()] == [f"{image_id}.webp"]
        await asyncio.sleep(TTL_S + 0.5)
        error = _envelope(await client.get(url), 404, "image_not_found")
        assert error["param"] == "image_id" and image_id in error["message"]
        assert not list(tmp_path.iterdir())  # the expired file is gone too
        assert (await client.get("/health/ready")).status_code == 200
