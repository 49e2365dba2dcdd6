"""Hostile input in process: escaped and bounded log text, integers of any length, the drain, readiness (503
while the model loads; without a key), bearer keys, 405's Allow header, the protected OpenAPI document, and no
API key in what a worker is told."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio
from fastapi import FastAPI

from diffuserve.api.app import build_app
from diffuserve.api.drain import Drain
from diffuserve.config import Settings
from diffuserve.engine.config import EngineConfig
from diffuserve.errors import InvalidRequest, ShuttingDown
from diffuserve.logs import JsonFormatter, TextFormatter, safe_text
from diffuserve.protocol import (
    LOGGED_FIELD_CHARS,
    LOGGED_UNKNOWN_FIELDS,
    ImageGenerationRequest,
    decode_json,
    describe_unknown_fields,
)
from diffuserve.serving.engine_config import engine_config
from tests import fakes
from tests.inprocess import JSON, URL, client_of, sample, served, settings, until

KEY = {"Authorization": "Bearer secret"}
ON_SERVED_LOOP = pytest.mark.asyncio(loop_scope="module")


# ---- log text -----------------------------------------------------------------------------------------


def test_safe_text_escapes_control_characters_and_truncates() -> None:
    assert safe_text("a\nERROR forged\r\x1b[31m\x00\u2028") == "a\\nERROR forged\\r\\x1b[31m\\x00\\u2028"
    long = safe_text("x" * 1000, 100)
    assert long.startswith("x" * 100) and long.endswith("[900 more]") and len(long) < 120


@pytest.mark.parametrize("formatter", [TextFormatter("server"), JsonFormatter("server")])
def test_a_forged_newline_stays_on_one_escaped_line(formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    protocol_log = logging.getLogger("diffuserve.protocol")
    saved = protocol_log.handlers, protocol_log.level, protocol_log.propagate
    protocol_log.handlers, protocol_log.propagate = [handler], False
    protocol_log.setLevel(logging.INFO)
    try:
        ImageGenerationRequest.parse({"prompt": "x", "a\n2026-01-01 ERROR [server] forged": 1})
        protocol_log.info("path %s", "/v1/\x1b[2J\nERROR x", extra={"path": "/a\nb", "request_id": "r\n"})
    finally:
        protocol_log.handlers, protocol_log.propagate = saved[0], saved[2]
        protocol_log.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    # JSON lines are read back as JSON: the escaped text must survive decoding, not only the encoding.
    text = [json.loads(line)["msg"] for line in lines] if isinstance(formatter, JsonFormatter) else lines
    assert "a\\n2026-01-01 ERROR [server] forged" in text[0]
    assert "\x1b" not in "".join(text) and "\n" not in "".join(text)


def test_unknown_field_logging_is_bounded() -> None:
    names = [f"field{i:06d}" + "y" * 500 for i in range(10_000)]
    described = describe_unknown_fields(names)
    assert described.startswith("field000000") and described.endswith(", …")
    assert described.count(", ") == LOGGED_UNKNOWN_FIELDS
    assert len(described) < LOGGED_UNKNOWN_FIELDS * (LOGGED_FIELD_CHARS + 20) + 40


# ---- JSON bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["seed", "n", "width", "num_inference_steps", "output_compression", "prompt", "user"]
)
def test_an_integer_of_5000_digits_is_a_400_naming_its_field(field: str) -> None:
    payload = decode_json(b'{"prompt": "x", "%s": %s}' % (field.encode(), b"9" * 5000))
    with pytest.raises(InvalidRequest) as caught:
        ImageGenerationRequest.parse(payload)
    assert caught.value.param == field and "out of range" in caught.value.message


def test_a_long_integer_in_an_unknown_field_is_ignored() -> None:
    parsed = ImageGenerationRequest.parse(decode_json(b'{"prompt": "x", "other": -%s}' % (b"1" * 5000)))
    assert parsed.prompt == "x"


@pytest.mark.parametrize(
    "raw", [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "x",', b'{"prompt": "\xff"}', b"NaN-ish"]
)
def test_bodies_json_cannot_decode_are_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        decode_json(raw)


def test_deep_nesting_inside_a_field_names_the_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        ImageGenerationRequest.parse(decode_json(b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}"))
    assert caught.value.param == "prompt"


# ---- the drain, in pure asyncio -----------------------------------------------------------------------


async def test_drain_lets_quick_work_finish_and_fails_slow_work() -> None:
    drain = Drain()
    quick = asyncio.ensure_future(drain.run(asyncio.sleep(0.05, result="done")))
    slow = asyncio.ensure_future(drain.run(asyncio.sleep(60)))
    await asyncio.sleep(0)
    assert drain.in_flight == 2
    assert await drain.drain(0.3) == 1
    assert await quick == "done"
    with pytest.raises(ShuttingDown):
        await slow
    with pytest.raises(ShuttingDown):
        await drain.run(asyncio.sleep(0))
    assert drain.in_flight == 0


# ---- the app over a stand-in worker, with keys --------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyed() -> AsyncIterator[FastAPI]:
    # Bodies up to 64 KiB: a 5000-digit integer must reach the parser, not the size check.
    async with served(settings(api_keys=["secret"], max_body_bytes=65536), fakes.FakeEngine) as app:
        yield app


@ON_SERVED_LOOP
async def test_readiness_shows_worker_pids_only_with_a_valid_key(keyed: FastAPI) -> None:
    async with client_of(keyed) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            public = await client.get("/health/ready", headers=headers)
            assert public.status_code == 200
            workers = public.json()["workers"]
            assert workers and all("pid" not in w and "pids" not in w for w in workers)
        private = await client.get("/health/ready", headers=KEY)
        assert all(isinstance(w["pid"], int) for w in private.json()["workers"])


@ON_SERVED_LOOP
async def test_a_5000_digit_integer_is_a_400_naming_the_field_and_counted(
    keyed: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    before = sample(keyed, "diffuserve_requests_total", status="400")
    async with client_of(keyed) as client:
        for field in ("seed", "n", "num_inference_steps"):
            body = b'{"prompt": "x", "%s": %s}' % (field.encode(), b"7" * 5000)
            headers = {**JSON, **KEY, "Content-Type": "application/json"}
            response = await client.post(URL, content=body, headers=headers)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == field
    assert sample(keyed, "diffuserve_requests_total", status="400") == before + 3
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@ON_SERVED_LOOP
async def test_405_carries_allow(keyed: FastAPI) -> None:
    async with client_of(keyed) as client:
        response = await client.delete("/v1/models", headers=KEY)
        assert response.status_code == 405 and response.headers["allow"] == "GET"
        assert response.json()["error"]["code"] == "method_not_allowed"
        response = await client.get(URL, headers=KEY)
        assert response.status_code == 405 and response.headers["allow"] == "POST"


@ON_SERVED_LOOP
async def test_openapi_document_is_protected_and_declares_the_images_body(keyed: FastAPI) -> None:
    async with client_of(keyed) as client:
        assert (await client.get("/openapi.json")).status_code == 401
        document = (await client.get("/openapi.json", headers=KEY)).json()
    paths = document["paths"]
    assert {
        "/v1/images/generations",
        "/v1/models",
        "/v1/models/{model_id}",
        "/health/ready",
        "/metrics",
    } <= set(paths)
    body = paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert (
        body["required"] == ["prompt"] and body["properties"]["seed"]["anyOf"][0]["maximum"] >= 2**63 - 2**11
    )
    responses = paths["/v1/images/generations"]["post"]["responses"]
    assert {"image/png", "application/json"} <= set(responses["200"]["content"])
    assert "default" in responses
    assert "/openapi.json" not in paths and "/" not in paths


@ON_SERVED_LOOP
async def test_drain_refuses_new_generations_and_fails_the_held_one(keyed: FastAPI, tmp_path: Path) -> None:
    async with client_of(keyed) as client:
        release = tmp_path / "release"
        held = asyncio.create_task(
            client.post(URL, json={"prompt": f"hold:{release}"}, headers={**JSON, **KEY})
        )
        await until(lambda: keyed.state.service.scheduler.in_flight)
        draining = asyncio.create_task(keyed.state.drain.drain(0.3))
        await until(lambda: keyed.state.drain.draining)
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = await client.post(URL, json={"prompt": "x"}, headers={**JSON, **KEY})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert await draining == 1
        failed = await held
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "shutting_down"
        release.touch()
        counted = keyed.state.metrics.registry.get_sample_value(
            "diffuserve_requests_total", {"model": "fake", "status": "503"}
        )
        assert counted == 1.0
    assert json.dumps(ready.json())


def test_the_servers_own_multiline_text_keeps_its_lines_but_arguments_are_escaped() -> None:
    formatter = TextFormatter("server")
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "Traceback:\n  line %s\n  %d", ("a\nb", 7), None
    )
    assert formatter.format(record).endswith("Traceback:\n  line a\\nb\n  7")
    wrong_type = logging.LogRecord("x", logging.INFO, __file__, 1, "%d items", ("3\n",), None)
    assert "\n" not in formatter.format(wrong_type)


# ---- readiness while the model loads, and bearer keys ------------------------------------------------


async def test_ready_is_503_while_loading_then_200_and_auth_applies(tmp_path: Path) -> None:
    keys = {"Authorization": "Bearer key-one"}
    # The stand-in loads its model only once `loaded` exists in its cache dir: the test decides when.
    slow = settings(api_keys=["key-one", "key-two"], model_repo="fake-slow-loading", cache_dir=str(tmp_path))
    async with served_loading(slow) as app, client_of(app) as client:
        ready = await client.get("/health/ready")
        early = await client.post(URL, json={"prompt": "x"}, headers={**JSON, **keys})
        assert ready.status_code == 503, "readiness must be 503 before the worker has loaded"
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_not_ready"
        (tmp_path / "loaded").touch()
        await until(lambda: app.state.service.ready)
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200

        # Health needs no key; everything else does.
        assert (await client.get("/health/live")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"}):
            response = await client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.post(URL, json={"prompt": "x"})).status_code == 401
        for key in ("key-one", "key-two"):
            ok = await client.post(URL, json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200


@asynccontextmanager
async def served_loading(app_settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running, before its worker is ready (`served` waits for that)."""
    app = build_app(app_settings, engine_factory=fakes.FakeEngine)
    async with app.router.lifespan_context(app):
        assert not app.state.service.ready
        yield app


# ---- what a worker is told ----------------------------------------------------------------------------


def test_a_worker_is_told_no_api_key_nor_hub_token() -> None:
    secrets = ("sk-never-in-a-worker-0001", "sk-never-in-a-worker-0002", "hf_never_in_a_worker")
    app_settings = Settings.from_env({}, api_keys=list(secrets[:2]), hf_token=secrets[2])
    assert app_settings.api_keys == list(secrets[:2])
    # What the pool pickles for each worker process it spawns.
    told = pickle.dumps(engine_config(app_settings))
    assert not [secret for secret in secrets if secret.encode() in told]
    # Nor could it be: the worker's config has no field for a key or a token.
    fields = {field.name for field in dataclasses.fields(EngineConfig)}
    assert not {name for name in fields if "key" in name or "token" in name or "auth" in name}, fields
