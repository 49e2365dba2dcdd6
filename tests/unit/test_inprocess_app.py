"""The app in this process (httpx's ASGITransport) over a stand-in engine worker: the error mapper, and the
service's splitting, cancellation, deadlines (504), backpressure (429 with Retry-After) and client disconnects
(499) as the routes drive them."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from diffuserve.api.app import build_app
from diffuserve.errors import DiffuserveError, QueueFull
from diffuserve.serving.service import GenerationService
from tests import fakes
from tests.inprocess import JSON, URL, Exchange, client_of, envelope, sample, served, settings, until

# The served app and its worker live for the whole module; its tests run on the module's event loop.
ON_SERVED_LOOP = pytest.mark.asyncio(loop_scope="module")


# ---- the error mapper, on an app whose workers never start ----------------------------------------------


def _all_errors() -> Iterator[type[DiffuserveError]]:
    yield DiffuserveError
    pending = list(DiffuserveError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        yield cls


async def test_every_error_class_maps_to_its_status_and_envelope() -> None:
    app = build_app(settings())
    classes = {cls.__name__: cls for cls in _all_errors()}

    async def raise_named(name: str) -> None:
        cls = classes[name]
        if cls is QueueFull:
            raise QueueFull("full", retry_after=3)
        raise cls(f"{name} happened", param="field")

    app.add_api_route("/raise/{name}", raise_named)
    statuses = set()
    async with client_of(app) as client:
        for name, cls in classes.items():
            response = await client.get(f"/raise/{name}")
            error = envelope(response, cls.status, cls.code)
            assert error["type"] == cls.type
            if cls is QueueFull:
                assert error["param"] is None and response.headers["retry-after"] == "3"
            else:
                assert error == {
                    "message": f"{name} happened",
                    "type": cls.type,
                    "param": "field",
                    "code": cls.code,
                }
            assert ("www-authenticate" in response.headers) == (cls.status == 401)
            statuses.add(response.status_code)
    assert statuses == {400, 401, 404, 405, 408, 409, 413, 415, 429, 499, 500, 503, 504}


async def test_an_unexpected_exception_is_a_bare_500_envelope() -> None:
    app = build_app(settings())

    async def broken() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/broken", broken)
    async with client_of(app) as client:
        response = await client.get("/broken", headers={"X-Request-Id": "trace-me"})
    error = envelope(response, 500, None)
    assert error == {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    assert "secret" not in response.text
    assert response.headers["x-request-id"] == "trace-me"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "param"),
    [
        ("GET", "/v1/nope", {}, 404, "not_found", None),
        ("GET", URL, {}, 405, "method_not_allowed", None),
        ("POST", URL, {"content": b"prompt=x", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type", "Content-Type"),
        ("POST", URL, {"json": {"prompt": "x" * 5000}}, 413, "payload_too_large", None),
        ("POST", URL, {"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "invalid_value",
         None),
        ("POST", URL, {"json": {"prompt": "x", "n": "2"}}, 400, "invalid_value", "n"),
        ("POST", URL, {"json": {"prompt": "x", "model": "nope"}}, 404, "model_not_found", "model"),
        ("POST", URL, {"json": {"prompt": "x"}}, 503, "model_not_ready", None),
    ],
)  # fmt: skip
async def test_requests_get_the_mapped_envelope(
    method: str, path: str, kwargs: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    async with client_of(build_app(settings())) as client:
        response = await client.request(method, path, **kwargs)
    assert envelope(response, status, code)["param"] == param


async def test_a_missing_key_is_401_with_a_challenge() -> None:
    async with client_of(build_app(settings(api_keys=["k-1"]))) as client:
        response = await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer k-1"})).status_code == 200
    assert envelope(response, 401, "invalid_api_key")["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


def test_no_route_declares_parameters_fastapi_would_validate() -> None:
    # The mapper has no RequestValidationError handler: routes read and validate their own input, so FastAPI
    # never raises one. A route with a typed query/body/header parameter would need that handler back.
    for route in build_app(settings()).routes:
        if not isinstance(route, APIRoute):
            continue
        for dependant in _with_dependencies(route.dependant):
            params = dependant.query_params + dependant.header_params + dependant.cookie_params
            assert not (params or dependant.body_params), route.path
            assert all(p.field_info.annotation is str for p in dependant.path_params), route.path


def _with_dependencies(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _with_dependencies(sub)


# ---- the served app: a real GenerationService and WorkerPool over one stand-in worker process ------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served_app() -> AsyncIterator[FastAPI]:
    """build_app's own wiring and lifespan, its workers running the real loop around a stand-in engine."""
    async with served(settings(), fakes.FakeEngine) as app:
        service: GenerationService = app.state.service
        yield app
        # Every test leaves the service as it found it: nothing queued, nothing running.
        assert (
            not service.service_for(None).scheduler.queue
            and not service.service_for(None).scheduler.in_flight
        )


@pytest_asyncio.fixture(loop_scope="module")
async def client(served_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(served_app) as client:
        yield client
    scheduler = served_app.state.service.service_for(None).scheduler
    assert not scheduler.queue and not scheduler.in_flight


@asynccontextmanager
async def held_worker(app: FastAPI, client: httpx.AsyncClient, tmp_path: Path) -> AsyncIterator[None]:
    """The only worker busy with a batch until the block ends; that request must then succeed."""
    release = tmp_path / "release"
    task = asyncio.create_task(client.post(URL, json={"prompt": f"hold:{release}"}, headers=JSON))
    await until(lambda: app.state.service.service_for(None).scheduler.in_flight)
    try:
        yield
    finally:
        release.touch()
        assert (await task).status_code == 200


def images_of(response: httpx.Response) -> list[tuple[int, str]]:
    assert response.status_code == 200, response.text
    return [(item["seed"], base64.b64decode(item["b64_json"]).decode()) for item in response.json()["data"]]


@ON_SERVED_LOOP
async def test_one_image_as_bytes_and_as_json(client: httpx.AsyncClient) -> None:
    raw = await client.post(URL, json={"prompt": "a cat", "seed": 3})
    assert raw.status_code == 200
    assert raw.content == b"a cat|seed=3|batch=1"
    assert raw.headers["x-seed"] == "3" and raw.headers["x-model"] == "fake"
    as_json = await client.post(URL, json={"prompt": "a cat", "seed": 3}, headers=JSON)
    assert images_of(as_json) == [(3, "a cat|seed=3|batch=1")]


@ON_SERVED_LOOP
async def test_n_above_model_batch_runs_as_parts_with_consecutive_seeds(
    served_app: FastAPI, client: httpx.AsyncClient
) -> None:
    batches_before = sample(served_app, "diffuserve_batch_size_count")
    response = await client.post(URL, json={"prompt": "five", "n": 5, "seed": 100}, headers=JSON)
    # MODEL_BATCH is 2: parts of 2, 2 and 1 images, seeds continuing across them, in order.
    assert images_of(response) == [
        (100 + i, f"five|seed={100 + i}|batch={2 if i < 4 else 1}") for i in range(5)
    ]
    assert sample(served_app, "diffuserve_batch_size_count") == batches_before + 3
    assert response.headers["x-batch-size"] == "2"


@ON_SERVED_LOOP
async def test_a_failed_batch_is_a_500_envelope(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json={"prompt": "fail"}, headers=JSON)
    assert "told to fail" in envelope(response, 500, "generation_failed")["message"]


@ON_SERVED_LOOP
async def test_a_cancelled_request_leaves_the_queue_before_it_runs(
    served_app: FastAPI, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    scheduler = served_app.state.service.service_for(None).scheduler
    batches_before = sample(served_app, "diffuserve_batch_size_count")
    async with held_worker(served_app, client, tmp_path):
        waiting = asyncio.create_task(client.post(URL, json={"prompt": "never run"}, headers=JSON))
        await until(lambda: scheduler.queue)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not scheduler.queue
    assert sample(served_app, "diffuserve_batch_size_count") == batches_before + 1  # the held batch alone


@ON_SERVED_LOOP
async def test_a_passed_deadline_is_a_504_and_leaves_the_queue(
    served_app: FastAPI, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with held_worker(served_app, client, tmp_path):
        started = time.monotonic()
        late = await client.post(URL, json={"prompt": "late"}, headers={**JSON, "X-Request-Timeout": "0.5"})
        waited = time.monotonic() - started
        envelope(late, 504, "deadline_exceeded")
        assert waited < 5, f"the 504 came {waited:.1f} s after a 0.5 s deadline"
        assert not served_app.state.service.service_for(None).scheduler.queue
    bad = await client.post(URL, json={"prompt": "x"}, headers={**JSON, "X-Request-Timeout": "soon"})
    assert envelope(bad, 400, "invalid_value")["param"] == "X-Request-Timeout"


@ON_SERVED_LOOP
async def test_a_full_queue_is_a_429_with_retry_after(
    served_app: FastAPI, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    scheduler = served_app.state.service.service_for(None).scheduler
    async with held_worker(served_app, client, tmp_path):
        queued = [
            asyncio.create_task(client.post(URL, json={"prompt": f"q{i}", "seed": i}, headers=JSON))
            for i in range(2)
        ]
        await until(lambda: len(scheduler.queue) == 2)  # MAX_QUEUE
        refused = await client.post(URL, json={"prompt": "one too many"}, headers=JSON)
        assert envelope(refused, 429, "queue_full")["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1
    # The refusal cost the queued requests nothing: once the worker is free they are served.
    assert [(await task).status_code for task in queued] == [200, 200]


@ON_SERVED_LOOP
async def test_a_client_that_disconnects_before_its_batch_is_dropped(
    served_app: FastAPI, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    scheduler = served_app.state.service.service_for(None).scheduler
    batches_before = sample(served_app, "diffuserve_batch_size_count")
    images_before = sample(served_app, "diffuserve_images_generated_total", model="fake")
    dropped_before = sample(served_app, "diffuserve_requests_total", model="fake", status="499")
    gone = Exchange(served_app, URL, {"prompt": "gone"}, JSON)
    async with held_worker(served_app, client, tmp_path):
        call = gone.start()
        await until(lambda: scheduler.queue)
        gone.hang_up.set()  # the client leaves while its request still waits behind the held batch
        await asyncio.wait_for(call, 5)
        assert not scheduler.queue
    assert gone.status == 499
    assert sample(served_app, "diffuserve_requests_total", model="fake", status="499") == dropped_before + 1
    # Only the held batch ran, and only its image was generated: the dropped request never reached a worker.
    assert sample(served_app, "diffuserve_batch_size_count") == batches_before + 1
    assert sample(served_app, "diffuserve_images_generated_total", model="fake") == images_before + 1
