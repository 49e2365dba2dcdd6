"""The app in this process: `build_app`'s own wiring and lifespan, its workers real processes running the real
worker loop around the engine a test picks (the built-in digits model, or tests/fakes.py's FakeEngine), reached
through httpx's ASGITransport, the official AsyncOpenAI client, or ASGI spoken directly where a client must hang
up mid-request."""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from diffuserve.api.app import build_app
from diffuserve.config import Settings
from diffuserve.serving.service import EngineFactory, load_engine
from tests.helpers import decode_image, pixels_body

if TYPE_CHECKING:
    from fastapi import FastAPI
    from openai import AsyncOpenAI

URL = "/v1/images/generations"
EDITS = "/v1/images/edits"
JSON = {"Accept": "application/json"}
BASE_URL = "http://testserver"


def settings(**overrides: Any) -> Settings:
    """A small server over the stand-in engine (tests/fakes.py): two images a batch, two requests queued, no
    batch window, bodies up to 4 KiB. The machine's own env vars (MODEL_REPO, API_KEYS …) are ignored."""
    base: dict[str, Any] = {
        "models": ["fake"],
        "model_name": "fake",
        "model_batch": 2,
        "max_queue": 2,
        "batch_wait_ms": 0.0,
        "devices": "cpu",
        "cpu_threads": 1,
        "request_timeout": 10.0,
        "max_body_bytes": 4096,
    }
    return Settings.from_env({}, **{**base, **overrides})


def digits_settings(**overrides: Any) -> Settings:
    """The built-in digits model on one CPU worker of one thread, batches of up to 8 images."""
    base: dict[str, Any] = {
        "models": ["digits"],
        "devices": "cpu",
        "cpu_threads": 1,
        "model_batch": 8,
        "batch_wait_ms": 20.0,
    }
    return Settings.from_env({}, **{**base, **overrides})


@asynccontextmanager
async def served(settings: Settings, engine_factory: EngineFactory = load_engine) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running and a worker ready; its image store in a temporary folder unless the
    settings name one."""
    with tempfile.TemporaryDirectory(prefix="diffuserve-images-") as store:
        if settings.image_store_dir is None:
            settings = settings.model_copy(update={"image_store_dir": store})
        app = build_app(settings, engine_factory=engine_factory)
        async with app.router.lifespan_context(app):
            await until(lambda: app.state.service.ready, timeout=120)
            yield app


def client_of(app: FastAPI, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL, **kwargs)


def sdk_of(app: FastAPI, api_key: str = "unused", **kwargs: Any) -> AsyncOpenAI:
    """The official client over the app (no retries: a failure must show as it happened)."""
    # Imported here, as in tests/helpers.py: the GPU machines import this module without the client installed.
    from openai import AsyncOpenAI

    return AsyncOpenAI(
        base_url=f"{BASE_URL}/v1",
        api_key=api_key,
        max_retries=0,
        http_client=client_of(app, timeout=120),
        **kwargs,
    )


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def envelope(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    """The OpenAI error envelope of `response`, checked: status, the four keys, code, no traceback, a request id."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"]
    return dict(error)


def sample(app: FastAPI, name: str, **labels: str) -> float:
    """A metric's value as /metrics shows it, summed over the labels not given (0 where none exists yet)."""
    return sum(
        found.value
        for family in app.state.metrics.registry.collect()
        for found in family.samples
        if found.name == name and all(found.labels.get(k) == v for k, v in labels.items())
    )


def pixels(data: bytes | str | None) -> np.ndarray:
    """An answer's image (bytes, or b64 text) as an int16 RGB array, ready to subtract."""
    assert data is not None
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(decode_image(raw).convert("RGB"), dtype=np.int16)


async def generate_pixels(
    client: httpx.AsyncClient, seed: int, n: int = 1, steps: int | None = None, prompt: str = "the digit 3"
) -> list[np.ndarray]:
    """`n` images for consecutive seeds over PNG (bytes = pixels)."""
    response = await client.post(URL, json=pixels_body(seed, n, steps, prompt), timeout=120)
    assert response.status_code == 200, response.text
    return [pixels(d["b64_json"]) for d in response.json()["data"]]


class Exchange:
    """One HTTP exchange spoken in ASGI directly, as uvicorn would: the client can hang up at any moment
    (`hang_up`), which httpx's ASGITransport cannot do, and the response is seen as it is sent."""

    def __init__(
        self, app: FastAPI, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.app = app
        self.hang_up = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self._body = json.dumps(body).encode()
        all_headers = {"content-type": "application/json", **(headers or {})}
        self._scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
        }  # fmt: skip
        self._delivered = False

    async def _receive(self) -> dict[str, Any]:
        if not self._delivered:
            self._delivered = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.app(self._scope, self._receive, self._send))

    @property
    def status(self) -> int | None:
        started = [m for m in self.sent if m["type"] == "http.response.start"]
        return started[0]["status"] if started else None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
