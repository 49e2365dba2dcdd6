"""Malformed or hostile edits (multipart and JSON) and streamed requests each get their 4xx envelope naming the
field, before any of them reaches a worker; the app (in process, on the built-in digits model) keeps serving
edits and generations afterwards."""

from __future__ import annotations

import base64
import io
import re
import struct
import time
import zlib
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI
from PIL import Image

from tests.helpers import decode_image
from tests.inprocess import EDITS, client_of, digits_settings, sample, served
from tests.inprocess import URL as GENERATIONS

pytestmark = pytest.mark.asyncio(loop_scope="module")
# Small limits so that modest test bodies cross them: a 400×400 picture has too many pixels, 3 MB is too large.
MAX_INPUT_PIXELS = 100_000
MAX_UPLOAD_BYTES = 2_000_000
# Refusing a picture by its header must not wait on decoding (a decoded 50000² RGB picture is 7.5 GB).
BOMB_REFUSED_WITHIN_S = 2.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[FastAPI]:
    app_settings = digits_settings(max_input_pixels=MAX_INPUT_PIXELS, max_upload_bytes=MAX_UPLOAD_BYTES)
    async with served(app_settings) as app:
        yield app


@pytest_asyncio.fixture(loop_scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, timeout=120) as client:
        yield client


def _encoded(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _picture(width: int = 32, height: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(width: int = 32, height: int = 32) -> bytes:
    """OpenAI's mask: the left half transparent (repainted), the right half opaque (kept)."""
    alpha = np.full((height, width), 255, dtype=np.uint8)
    alpha[:, : width // 2] = 0
    rgba = np.dstack([np.zeros((height, width, 3), dtype=np.uint8), alpha])
    return _encoded(Image.fromarray(rgba, "RGBA"))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width×height RGB pixels: the IDAT holds one row's worth,
    so only a server that decodes before checking the header would notice it is short."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


GOOD_PNG = _encoded(_picture())
GOOD_MASK = _mask()
BOMB = _png_claiming(50_000, 50_000)
PROMPT = {"prompt": "the digit 8"}


def _form(image: bytes | None = GOOD_PNG, mask: bytes | None = None, **fields: str) -> dict:
    """httpx kwargs for a multipart edit as the OpenAI SDK sends it."""
    files = {}
    if image is not None:
        files["image"] = ("image.png", image, "image/png")
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return {"files": files, "data": {**PROMPT, **fields}}


def _images(count: int) -> dict:
    """`count` pictures as repeated `image[]` parts, as the SDK sends a list of images."""
    return {"files": [("image[]", (f"{i}.png", GOOD_PNG, "image/png")) for i in range(count)], "data": PROMPT}


def _json(**body: object) -> dict:
    return {"json": {**PROMPT, "images": [{"image_url": _data_url(GOOD_PNG)}], **body}}


def _raw(content: bytes, content_type: str) -> dict:
    return {"content": content, "headers": {"Content-Type": content_type}}


class _Chunked:
    """A body of `size` bytes sent with chunked transfer encoding (no Content-Length to refuse it by); unlike a
    generator it can be sent again, as each parametrized run or a rerun does."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.size // 65536):
            yield b"\0" * 65536


# (case id, request kwargs for httpx, expected status, expected `param` or None)
EDIT_CASES: list[tuple[str, dict, int, str | None]] = [
    # pictures that are not what they claim
    ("text bytes as a .png", _form(b"this is not a picture"), 400, "image"),
    ("PNG cut after its header", _form(GOOD_PNG[:40]), 400, "image"),
    ("PNG cut mid-pixels", _form(GOOD_PNG[: len(GOOD_PNG) // 2]), 400, "image"),
    ("decompression bomb 50000x50000", _form(BOMB), 400, "image"),
    ("header over MAX_INPUT_PIXELS, under Pillow's", _form(_png_claiming(9000, 9000)), 400, "image"),
    ("400x400 over MAX_INPUT_PIXELS", _form(_encoded(_picture(400, 400))), 400, "image"),
    ("GIF", _form(_encoded(_picture(), "GIF")), 400, "image"),
    ("BMP", _form(_encoded(_picture(), "BMP")), 400, "image"),
    ("empty file", _form(b""), 400, "image"),
    # masks
    ("mask size differs", _form(mask=_mask(16, 16)), 400, "mask"),
    ("mask without alpha", _form(mask=GOOD_PNG), 400, "mask"),
    ("mask is a bomb", _form(mask=BOMB), 400, "mask"),
    ("mask sent twice", {"files": [("image", ("i.png", GOOD_PNG, "image/png")), ("mask", ("a.png", GOOD_MASK, "image/png")), ("mask", ("b.png", GOOD_MASK, "image/png"))], "data": PROMPT}, 400, "mask"),
    ("mask as a text field", {"files": {"image": ("i.png", GOOD_PNG, "image/png")}, "data": {**PROMPT, "mask": "left half"}}, 400, "mask"),
    # how many pictures, and how they are sent
    ("17 images", _images(17), 400, "image[16]"),
    ("40 images", _images(40), 400, "image"),
    ("no image", {"files": {"mask": ("mask.png", GOOD_MASK, "image/png")}, "data": PROMPT}, 400, "image"),
    ("image as a text field", {"files": {"mask": ("mask.png", GOOD_MASK, "image/png")}, "data": {**PROMPT, "image": "a cat"}}, 400, "image"),
    ("unknown file field", {"files": {"image": ("i.png", GOOD_PNG, "image/png"), "photo": ("p.png", GOOD_PNG, "image/png")}, "data": PROMPT}, 400, "photo"),
    # text fields of the form (every value arrives as text)
    ("no prompt", {"files": {"image": ("i.png", GOOD_PNG, "image/png")}}, 400, "prompt"),
    ("prompt given twice", {"files": {"image": ("i.png", GOOD_PNG, "image/png")}, "data": {"prompt": ["a", "b"]}}, 400, "prompt"),
    ("strength 0", _form(strength="0"), 400, "strength"),
    ("strength 1.5", _form(strength="1.5"), 400, "strength"),
    ("strength abc", _form(strength="abc"), 400, "strength"),
    ("strength nan in a form", _form(strength="nan"), 400, "strength"),
    ("n above the limit", _form(n="11"), 400, "n"),
    ("n zero", _form(n="0"), 400, "n"),
    ("background transparent", _form(background="transparent"), 400, "background"),
    ("input_fidelity bogus", _form(input_fidelity="max"), 400, "input_fidelity"),
    ("size 7x7", _form(size="7x7"), 400, "size"),
    ("response_format bogus", _form(response_format="xml"), 400, "response_format"),
    # streaming an edit
    ("stream maybe", _form(stream="maybe"), 400, "stream"),
    ("partial_images 4", _form(stream="true", partial_images="4"), 400, "partial_images"),
    ("partial_images -1", _form(stream="true", partial_images="-1"), 400, "partial_images"),
    ("stream with n above the limit", _form(stream="true", n="11"), 400, "n"),
    # the JSON form
    ("JSON images not a list", {"json": {**PROMPT, "images": {"image_url": _data_url(GOOD_PNG)}}}, 400, "images"),
    ("JSON images empty", {"json": {**PROMPT, "images": []}}, 400, "images"),
    ("JSON image a bare string", {"json": {**PROMPT, "images": [_data_url(GOOD_PNG)]}}, 400, "images[0]"),
    ("JSON image_url https", {"json": {**PROMPT, "images": [{"image_url": "https://example.com/a.png"}]}}, 400, "images[0].image_url"),
    ("JSON data URL not base64", {"json": {**PROMPT, "images": [{"image_url": "data:image/png,abc"}]}}, 400, "images[0].image_url"),
    ("JSON bad base64", {"json": {**PROMPT, "images": [{"image_url": "data:image/png;base64,@@not base64!"}]}}, 400, "images[0].image_url"),
    ("JSON image_url a number", {"json": {**PROMPT, "images": [{"image_url": 7}]}}, 400, "images[0].image_url"),
    ("JSON file_id", {"json": {**PROMPT, "images": [{"file_id": "file-abc123"}]}}, 400, "images[0].file_id"),
    ("JSON `image` key", {"json": {**PROMPT, "image": _data_url(GOOD_PNG)}}, 400, "image"),
    ("JSON 17 images", {"json": {**PROMPT, "images": [{"image_url": _data_url(GOOD_PNG)}] * 17}}, 400, "images"),
    ("JSON second image a GIF", {"json": {**PROMPT, "images": [{"image_url": _data_url(GOOD_PNG)}, {"image_url": _data_url(_encoded(_picture(), "GIF"), "image/gif")}]}}, 400, "images[1]"),
    ("JSON mask https", _json(mask={"image_url": "https://example.com/m.png"}), 400, "mask.image_url"),
    ("JSON mask not an object", _json(mask="left half"), 400, "mask"),
    ("JSON mask without alpha", _json(mask={"image_url": _data_url(GOOD_PNG)}), 400, "mask"),
    ("JSON strength NaN", _raw(b'{"prompt": "x", "images": [{"image_url": "%s"}], "strength": NaN}' % _data_url(GOOD_PNG).encode(), "application/json"), 400, "strength"),
    ("JSON strength as a string", _json(strength="0.5"), 400, "strength"),
    ("JSON stream as a string", _json(stream="true"), 400, "stream"),
    ("JSON partial_images 4", _json(stream=True, partial_images=4), 400, "partial_images"),
    ("JSON body a list", {"json": [PROMPT]}, 400, None),
    ("JSON cut short", _raw(b'{"prompt": "x", "images": [', "application/json"), 400, None),
    # the body itself
    ("multipart wrong boundary", _raw(b'--AAA\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--AAA--\r\n', "multipart/form-data; boundary=BBB"), 400, None),
    ("multipart without boundary", _raw(b"garbage", "multipart/form-data"), 400, None),
    ("multipart garbage body", _raw(b"\x00\xff" * 1000, "multipart/form-data; boundary=zz"), 400, None),
    ("multipart part without name", _raw(b"--zz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zz--\r\n", "multipart/form-data; boundary=zz"), 400, None),
    ("form field over 256 KB", _form(user="u" * 300_000), 400, None),
    ("3 MB body", _form(b"\0" * 3_000_000), 413, None),
    ("3 MB chunked body", {"content": _Chunked(3_000_000), "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, 413, None),
    ("text/plain", _raw(b"draw an 8", "text/plain"), 415, "Content-Type"),
    ("urlencoded form", {"data": PROMPT}, 415, "Content-Type"),
]  # fmt: skip

# Streaming on generations: every refusal comes before the stream starts, as a plain JSON envelope.
STREAM_CASES: list[tuple[str, dict, int, str | None]] = [
    ("stream 1", {"json": {**PROMPT, "stream": 1}}, 400, "stream"),
    ("partial_images -1", {"json": {**PROMPT, "stream": True, "partial_images": -1}}, 400, "partial_images"),
    ("partial_images as a string", {"json": {**PROMPT, "stream": True, "partial_images": "2"}}, 400, "partial_images"),
    ("partial_images 1.5", {"json": {**PROMPT, "stream": True, "partial_images": 1.5}}, 400, "partial_images"),
    ("stream with response_format url", {"json": {**PROMPT, "stream": True, "response_format": "url"}}, 400, "response_format"),
    ("stream with n above the limit", {"json": {**PROMPT, "stream": True, "n": 11}}, 400, "n"),
    ("stream with background transparent", {"json": {**PROMPT, "stream": True, "background": "transparent"}}, 400, "background"),
]  # fmt: skip


@pytest.fixture(scope="module")
def batches_before(app: FastAPI) -> float:
    """How many batches the worker had run before the first bad request."""
    return sample(app, "diffuserve_batch_size_count")


def _assert_envelope(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    # A refused stream is refused before it starts: a JSON envelope, never an event stream.
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize(("case", "kwargs", "status", "param"), EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
async def test_bad_edit_gets_openai_envelope(
    client: httpx.AsyncClient, batches_before: float, case: str, kwargs: dict, status: int, param: str | None
) -> None:
    kwargs = dict(kwargs)
    headers = {"Accept": "application/json", **kwargs.pop("headers", {})}
    response = await client.post(EDITS, headers=headers, **kwargs)
    _assert_envelope(response, status, param)


@pytest.mark.parametrize(
    ("case", "kwargs", "status", "param"), STREAM_CASES, ids=[c[0] for c in STREAM_CASES]
)
async def test_bad_stream_gets_openai_envelope(
    client: httpx.AsyncClient, batches_before: float, case: str, kwargs: dict, status: int, param: str | None
) -> None:
    response = await client.post(GENERATIONS, headers={"Accept": "application/json"}, **kwargs)
    _assert_envelope(response, status, param)


async def test_bomb_is_refused_from_its_header(client: httpx.AsyncClient) -> None:
    assert len(BOMB) < 200  # a few dozen bytes that claim 2.5 billion pixels
    for _ in range(3):  # the first request pays for any lazy setup
        started = time.perf_counter()
        response = await client.post(EDITS, **_form(BOMB))
        elapsed = time.perf_counter() - started
        _assert_envelope(response, 400, "image")
    assert elapsed < BOMB_REFUSED_WITHIN_S, f"{elapsed:.2f} s to refuse a bomb"


async def test_server_still_serves_after_abuse(
    app: FastAPI, client: httpx.AsyncClient, batches_before: float
) -> None:
    # Runs after the tables: none of their requests reached a worker.
    assert sample(app, "diffuserve_batch_size_count") == batches_before
    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert all(worker["restarts"] == 0 for worker in ready.json()["workers"])

    edit = await client.post(EDITS, **_form(mask=GOOD_MASK, seed="1"))
    assert edit.status_code == 200, edit.text
    assert decode_image(edit.content).size == (32, 32)
    json_edit = await client.post(EDITS, **_json(response_format="b64_json", output_format="png"))
    assert json_edit.status_code == 200, json_edit.text
    assert decode_image(base64.b64decode(json_edit.json()["data"][0]["b64_json"])).format == "PNG"
    generation = await client.post(GENERATIONS, json=PROMPT)
    assert generation.status_code == 200, generation.text
    assert generation.headers["content-type"] == "image/webp"
    streamed = await client.post(GENERATIONS, json={**PROMPT, "stream": True, "partial_images": 1})
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = re.findall(r"^event: (\S+)$", streamed.text, re.M)
    assert events == ["image_generation.partial_image", "image_generation.completed"]
    assert (await client.get("/health/ready")).status_code == 200
