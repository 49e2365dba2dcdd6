"""Malformed or hostile requests each get the right 4xx envelope from the app in process (its worker the stand-in
engine: none of these reaches it); the app keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests import fakes
from tests.inprocess import URL, client_of, sample, served, settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

GOOD = {"prompt": "the digit 1"}

# (case id, request kwargs for httpx, expected status, expected `param` or None)
CASES: list[tuple[str, dict, int, str | None]] = [
    ("missing prompt", {"json": {}}, 400, "prompt"),
    ("empty prompt", {"json": {"prompt": ""}}, 400, "prompt"),
    ("prompt not a string", {"json": {"prompt": 42}}, 400, "prompt"),
    ("prompt is a list", {"json": {"prompt": ["a", "b"]}}, 400, "prompt"),
    ("body is a list", {"json": [GOOD]}, 400, None),
    ("body is a string", {"json": "draw"}, 400, None),
    ("n as string", {"json": {**GOOD, "n": "2"}}, 400, "n"),
    ("n zero", {"json": {**GOOD, "n": 0}}, 400, "n"),
    ("n thousand", {"json": {**GOOD, "n": 1000}}, 400, "n"),
    ("n float", {"json": {**GOOD, "n": 1.5}}, 400, "n"),
    ("size 7x7", {"json": {**GOOD, "size": "7x7"}}, 400, "size"),
    ("size huge", {"json": {**GOOD, "size": "100000x100000"}}, 400, "size"),
    ("size garbage", {"json": {**GOOD, "size": "big"}}, 400, "size"),
    ("size negative", {"json": {**GOOD, "size": "-32x32"}}, 400, "size"),
    ("width without height", {"json": {**GOOD, "width": 32}}, 400, "height"),
    ("width not multiple", {"json": {**GOOD, "width": 33, "height": 32}}, 400, "width"),
    ("size and aspect", {"json": {**GOOD, "size": "32x32", "aspect_ratio": "1:1"}}, 400, "aspect_ratio"),
    ("bad aspect ratio", {"json": {**GOOD, "aspect_ratio": "5:1"}}, 400, "aspect_ratio"),
    ("steps negative", {"json": {**GOOD, "num_inference_steps": -1}}, 400, "num_inference_steps"),
    ("steps million", {"json": {**GOOD, "num_inference_steps": 10**6}}, 400, "num_inference_steps"),
    ("guidance NaN-like string", {"json": {**GOOD, "guidance_scale": "NaN"}}, 400, "guidance_scale"),
    ("guidance huge", {"json": {**GOOD, "guidance_scale": 1e9}}, 400, "guidance_scale"),
    ("seed negative", {"json": {**GOOD, "seed": -5}}, 400, "seed"),
    ("seed too big", {"json": {**GOOD, "seed": 2**70}}, 400, "seed"),
    ("seed string", {"json": {**GOOD, "seed": "111"}}, 400, "seed"),
    ("bad output format", {"json": {**GOOD, "output_format": "gif"}}, 400, "output_format"),
    ("compression 101", {"json": {**GOOD, "output_compression": 101}}, 400, "output_compression"),
    ("response_format bogus", {"json": {**GOOD, "response_format": "xml"}}, 400, "response_format"),
    ("stream as a string", {"json": {**GOOD, "stream": "yes"}}, 400, "stream"),
    ("partial_images 4", {"json": {**GOOD, "stream": True, "partial_images": 4}}, 400, "partial_images"),
    ("negative prompt on FLUX", {"json": {**GOOD, "negative_prompt": "blurry"}}, 400, "negative_prompt"),
    ("n>1 as raw bytes", {"json": {**GOOD, "n": 2}, "headers": {"Accept": "*/*"}}, 400, "n"),
    ("unknown model field", {"json": {**GOOD, "model": "dall-e-3"}}, 404, "model"),
    ("unknown model header", {"json": GOOD, "headers": {"X-Model-Name": "nope"}}, 404, "model"),
    ("invalid JSON", {"content": b'{"prompt": "x",', "headers": {"Content-Type": "application/json"}}, 400, None),
    ("not utf-8", {"content": b'{"prompt": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}}, 400, None),
    ("empty body", {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, None),
    ("form content type", {"data": {"prompt": "x"}}, 415, "Content-Type"),
    ("text content type", {"content": b'{"prompt":"x"}', "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
    ("10 MB prompt", {"json": {"prompt": "x" * 10_000_000}}, 413, None),
    ("prompt over limit", {"json": {"prompt": "y" * 20_000}}, 400, "prompt"),
    ("deeply nested", {"content": b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": {"Content-Type": "application/json"}}, 400, None),
    ("bad timeout header", {"json": GOOD, "headers": {"X-Request-Timeout": "soon"}}, 400, "X-Request-Timeout"),
]  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[FastAPI]:
    """The server's own limits (bodies up to 1 MiB, 10 images a request), the stand-in engine's model."""
    async with served(settings(model_batch=8, max_queue=64, max_body_bytes=1 << 20), fakes.FakeEngine) as app:
        yield app


@pytest_asyncio.fixture(loop_scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, timeout=30) as client:
        yield client


@pytest.mark.parametrize(("case", "kwargs", "status", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_request_gets_openai_envelope(
    app: FastAPI, client: httpx.AsyncClient, case: str, kwargs: dict, status: int, param: str | None
) -> None:
    kwargs = dict(kwargs)
    headers = {"Accept": "application/json", **kwargs.pop("headers", {})}
    batches_before = sample(app, "diffuserve_batch_size_count")
    response = await client.post(URL, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["type"] in {"invalid_request_error"}
    if param is not None:
        assert error["param"] == param, error
    assert sample(app, "diffuserve_batch_size_count") == batches_before, "a refused request reached a worker"


# Image URL ids a client made up: (case id, path, expected status, expected code). None touches the filesystem:
# ids are checked against the store's exact pattern first; a decoded `/` never matches the route at all.
CONTENT_CASES: list[tuple[str, str, int, str]] = [
    ("well-formed unknown id", f"/v1/images/{'A' * 32}/content", 404, "image_not_found"),
    ("unknown id without /v1", f"/images/{'B' * 32}/content", 404, "image_not_found"),
    ("dot-dot id", "/v1/images/%2e%2e/content", 404, "image_not_found"),
    ("encoded traversal", "/v1/images/..%2F..%2Fetc%2Fpasswd/content", 404, "not_found"),
    ("traversal with backslashes", "/v1/images/..%5C..%5Cetc%5Cpasswd/content", 404, "image_not_found"),
    ("id with a file suffix", f"/v1/images/{'a' * 28}.png/content", 404, "image_not_found"),
    ("id one character short", f"/v1/images/{'a' * 31}/content", 404, "image_not_found"),
    ("id with NUL bytes", f"/v1/images/{'a' * 16}%00{'a' * 15}/content", 404, "image_not_found"),
    ("id with a newline", f"/v1/images/{'a' * 31}%0A/content", 404, "image_not_found"),
    ("non-ASCII id", f"/v1/images/{'%C3%A9' * 32}/content", 404, "image_not_found"),
    ("8 kB id", f"/v1/images/{'a' * 8192}/content", 404, "image_not_found"),
    ("content of the generations route", "/v1/images/generations/content", 404, "image_not_found"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "path", "status", "code"), CONTENT_CASES, ids=[c[0] for c in CONTENT_CASES])
async def test_made_up_image_ids_get_a_404_envelope(
    client: httpx.AsyncClient, case: str, path: str, status: int, code: str
) -> None:
    response = await client.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert len(error["message"]) < 300  # a long id is cut, not echoed whole


async def test_unknown_route_and_method_are_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v1/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong_method = await client.get(URL)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


async def test_server_still_serves_after_abuse(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=GOOD)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    stored = await client.post(URL, json={**GOOD, "response_format": "url"})
    assert stored.status_code == 200, stored.text
    assert (await client.get(stored.json()["data"][0]["url"])).status_code == 200
