"""Reading an edit's body: OpenAI's multipart form (`image` or repeated `image[]` files, `mask`, text fields)
or its JSON form (`images: [{"image_url": "data:…"}]`, `mask: {"image_url": …}`), bounded in bytes and time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from diffuserve.api.deps import read_body
from diffuserve.config import Settings
from diffuserve.errors import InvalidRequest, UnsupportedMediaType
from diffuserve.protocol import decode_json
from diffuserve.protocol.edits import MAX_EDIT_IMAGES, ImageEditRequest
from diffuserve.protocol.pictures import decode_data_url
from diffuserve.types import GenerationRequest, ModelInfo

IMAGE_FIELDS = ("image", "image[]")
# Text fields of a form are small: a prompt of 10,000 characters fits many times over.
MAX_FORM_FIELD_BYTES = 256 * 1024
MAX_FORM_FIELDS = 64
# A JSON body above this is decoded (parsed, then its data URLs' base64) in a thread: tens of megabytes take
# tens of milliseconds, which the event loop, serving every other connection, must not spend.
JSON_IN_THREAD_BYTES = 256 * 1024


@dataclass
class EditBody:
    """An edit request as received: its fields (text values when `form` is true), its pictures' bytes, each
    with the field that carried it, and the mask's bytes."""

    fields: dict[str, Any]
    pictures: list[tuple[str, bytes]] = field(default_factory=list)
    mask: bytes | None = None
    form: bool = False


def fitted_edit(
    body: ImageEditRequest,
    received: EditBody,
    *,
    request_id: str,
    model: ModelInfo,
    settings: Settings,
    stop: threading.Event,
) -> GenerationRequest:
    """The edit in the engine's units, its pictures decoded and fitted under the server's limits (blocking: run
    it in a thread; `stop` ends the decoding early)."""
    return body.to_edit(
        request_id=request_id,
        model=model,
        max_images=settings.max_images_per_request,
        uploads=received.pictures,
        mask=received.mask,
        max_pixels=settings.max_input_pixels,
        max_cost=settings.max_request_cost,
        stop=stop,
    )


async def read_edit_body(request: Request, limit: int, timeout: float) -> EditBody:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_form(request, limit, timeout)
    if media_type == "application/json" or media_type.endswith("+json"):
        raw = await read_body(request, limit, timeout)
        if len(raw) <= JSON_IN_THREAD_BYTES:
            return edit_body_from_json(decode_json(raw))
        return await asyncio.to_thread(_from_large_json, raw)
    raise UnsupportedMediaType(
        f"Content-Type must be multipart/form-data or application/json, got {content_type or 'none'!r}",
        param="Content-Type",
    )


async def _read_form(request: Request, limit: int, timeout: float) -> EditBody:
    raw = await read_body(request, limit, timeout)

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield raw

    parser = MultiPartParser(
        request.headers,
        chunks(),
        max_files=MAX_EDIT_IMAGES + 2,
        max_fields=MAX_FORM_FIELDS,
        max_part_size=MAX_FORM_FIELD_BYTES,
    )
    try:
        form = await asyncio.wait_for(parser.parse(), timeout)
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            # Starlette stops at `max_files`: a form with too many images is a well-formed request that sends
            # more than the limit, and its answer names the field like the count check after parsing does.
            raise InvalidRequest(
                f"at most {MAX_EDIT_IMAGES} images and one mask per edit", param="image"
            ) from None
        raise InvalidRequest(f"malformed multipart form: {exc.message}") from None
    except (ClientDisconnect, asyncio.TimeoutError):
        raise InvalidRequest("malformed multipart form") from None
    body = EditBody(fields={}, form=True)
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                if name in IMAGE_FIELDS:
                    # Errors name an `image[]` part by its index, as OpenAI names array items: `image[16]`.
                    body.pictures.append(
                        (f"image[{len(body.pictures)}]" if name == "image[]" else name, data)
                    )
                elif name == "mask":
                    if body.mask is not None:
                        raise InvalidRequest("send one `mask`", param="mask")
                    body.mask = data
                else:
                    raise InvalidRequest(f"`{name[:64]}` is not a file field", param=name[:64])
            elif name in IMAGE_FIELDS or name == "mask":
                raise InvalidRequest(f"`{name}` must be a file, not text", param=name)
            elif name in body.fields:
                raise InvalidRequest(f"`{name[:64]}` is given twice", param=name[:64])
            else:
                body.fields[name] = value
    finally:
        await form.close()
    return body


def _from_large_json(raw: bytes) -> EditBody:
    try:
        payload = orjson.loads(raw)  # several times faster than json on megabytes of base64 text
    except orjson.JSONDecodeError:
        payload = decode_json(raw)  # raises the same 400 a small body gets
    return edit_body_from_json(payload)


def edit_body_from_json(payload: Any) -> EditBody:
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    fields = dict(payload)
    images = fields.pop("images", None)
    mask = fields.pop("mask", None)
    if "image" in fields:
        raise InvalidRequest(
            '`image` is the form field; a JSON body sends `images: [{"image_url": "data:…"}]`', param="image"
        )
    if not isinstance(images, list) or not images:
        raise InvalidRequest(
            '`images` is required: a list of {"image_url": "data:image/png;base64,…"} objects', param="images"
        )
    if len(images) > MAX_EDIT_IMAGES:
        raise InvalidRequest(f"at most {MAX_EDIT_IMAGES} images per edit, got {len(images)}", param="images")
    body = EditBody(fields=fields)
    for index, reference in enumerate(images):
        body.pictures.append((f"images[{index}]", _reference_bytes(reference, f"images[{index}]")))
    if mask is not None:
        body.mask = _reference_bytes(mask, "mask")
    return body


def _reference_bytes(reference: Any, param: str) -> bytes:
    """OpenAI's image reference object: `image_url` (a data URL here) or `file_id` (no Files API here)."""
    if not isinstance(reference, dict):
        raise InvalidRequest(f'`{param}` must be an object like {{"image_url": "data:…"}}', param=param)
    if "file_id" in reference:
        raise InvalidRequest(
            f"`{param}.file_id`: this server has no Files API; send the image as a data URL in `image_url`",
            param=f"{param}.file_id",
        )
    return decode_data_url(reference.get("image_url"), f"{param}.image_url")
