"""Hostile input in process: escaped and bounded log text, integers of any length, the drain, readiness (503
while the model loads; without a key), bearer keys, 405's Allow header, the protected OpenAPI document, no API
key in what a worker is told, outcomes nobody awaits, and pictures checked from their headers."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import io
import json
import logging
import pickle
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio
from fastapi import FastAPI
from PIL import ExifTags, Image

from diffuserve.api.app import build_app
from diffuserve.api.drain import Drain
from diffuserve.api.edit_body import JSON_IN_THREAD_BYTES, _from_large_json, edit_body_from_json
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
from diffuserve.protocol.pictures import (
    MAX_ASPECT_RATIO,
    MAX_JPEG_SCANS,
    MAX_SIDE,
    DecodeStopped,
    fit_picture,
    jpeg_scans,
    open_picture,
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
        await until(lambda: keyed.state.service.service_for(None).scheduler.in_flight)
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
    slow = settings(api_keys=["key-one", "key-two"], models=["fake-slow-loading"], cache_dir=str(tmp_path))
    async with served_loading(slow) as app, client_of(app) as client:
        ready = await client.get("/health/ready")
        early = await client.post(URL, json={"prompt": "x"}, headers={**JSON, **keys})
        assert ready.status_code == 503, "readiness must be 503 before the worker has loaded"
        await until(lambda: [w.get("phase") for w in app.state.service.describe_workers()] == ["loading"])
        loading = (await client.get("/health/ready")).json()
        assert loading["models"] == [
            {"name": "fake", "repo": "fake-slow-loading", "devices": ["cpu"], "status": "loading"}
        ]
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


# ---- outcomes nobody awaits -------------------------------------------------------------------------------


async def test_work_that_fails_as_its_request_leaves_is_not_reported_as_never_retrieved() -> None:
    """A hang-up seen twice: the generation ends in failure (its client is gone) in the same turn of the loop
    in which the stream cancels the request. asyncio must not log "Task exception was never retrieved"."""
    reported: list[dict] = []
    loop = asyncio.get_running_loop()
    saved = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:

        async def fails() -> None:
            raise RuntimeError("the client is gone")

        request = asyncio.ensure_future(Drain().run(fails()))
        await asyncio.sleep(0)  # the request starts its work and waits on it
        await asyncio.sleep(0)  # the work fails; the request's wake-up is only scheduled
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        del request
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(saved)
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported


# ---- pictures: checked from their headers -----------------------------------------------------------------


def _jpeg(size: tuple[int, int], **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _repeat_last_scan(data: bytes, times: int) -> bytes:
    ends, at = [], 2
    while data[at + 1] != 0xD9:
        marker = data[at + 1]
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xDA:
            at = data.find(b"\xff", at)
            while data[at + 1] == 0 or 0xD0 <= data[at + 1] <= 0xD7:
                at = data.find(b"\xff", at + 2)
            ends.append(at)
    return data[: ends[-1]] + data[ends[-2] : ends[-1]] * times + data[ends[-1] :]


def test_jpeg_scans_are_counted_by_walking_the_segments() -> None:
    assert jpeg_scans(_jpeg((64, 48)), 1000) == 1
    progressive = _jpeg((64, 48), progressive=True)
    assert jpeg_scans(progressive, 1000) == 10  # libjpeg's progressive script for colour
    assert jpeg_scans(_repeat_last_scan(progressive, 500), 1000) == 510
    assert jpeg_scans(_repeat_last_scan(progressive, 500), MAX_JPEG_SCANS) == MAX_JPEG_SCANS + 1
    # Marker bytes inside metadata are not scans.
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", comment=b"\xff\xda" * 100)
    assert jpeg_scans(buffer.getvalue(), 1000) == 1


def test_a_scan_bomb_is_refused_before_decoding() -> None:
    bomb = _repeat_last_scan(_jpeg((256, 256), progressive=True), MAX_JPEG_SCANS)
    with pytest.raises(InvalidRequest, match="scans") as refused:
        open_picture(bomb, "image[1]", 1 << 24)
    assert refused.value.param == "image[1]"
    fine = _repeat_last_scan(_jpeg((256, 256), progressive=True), 5)
    assert open_picture(fine, "image", 1 << 24).size == (256, 256)


@pytest.mark.parametrize(
    ("size", "words"),
    [((1, 4096), f"at most {MAX_ASPECT_RATIO}:1"), ((MAX_SIDE + 8, 1100), f"at most {MAX_SIDE} pixels")],
)
def test_thin_and_long_pictures_are_refused_from_their_header(size: tuple[int, int], words: str) -> None:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, "PNG")
    with pytest.raises(InvalidRequest, match=words):
        open_picture(buffer.getvalue(), "image", 1 << 24)


def test_pictures_decode_straight_to_the_output_size_upright() -> None:
    # A JPEG taken sideways: stored 400x200, shown 200x400 (EXIF orientation 6).
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    picture = open_picture(_jpeg((400, 200), exif=exif.tobytes()), "image", 1 << 24)
    assert picture.size == (200, 400)
    fitted = fit_picture(picture, 48, 96)
    assert fitted.shape == (96, 48, 3)
    # libjpeg decoded at 1/4 of the size (100x50, the nearest scale at least the output's), not at 400x200.
    assert picture.image.size == (100, 50)


def test_a_decoding_called_off_stops_at_its_next_read() -> None:
    stop = threading.Event()
    picture = open_picture(_jpeg((512, 512), progressive=True), "image", 1 << 24, stop)
    stop.set()
    with pytest.raises(DecodeStopped):
        fit_picture(picture, 64, 64)


def test_a_large_json_edit_body_decodes_off_the_loop_as_a_small_one_does() -> None:
    picture = base64.b64encode(_jpeg((64, 64))).decode()
    payload = {
        "prompt": "x",
        "images": [{"image_url": f"data:image/jpeg;base64,{picture}"}],
        "pad": "y" * 300_000,
    }
    raw = json.dumps(payload).encode()
    assert len(raw) > JSON_IN_THREAD_BYTES
    large, small = _from_large_json(raw), edit_body_from_json(decode_json(raw))
    assert large.fields == small.fields and large.pictures == small.pictures
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        _from_large_json(raw[:-1])
