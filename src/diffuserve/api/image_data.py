"""The `data` entries of an images answer: each image as base64, or as a URL of its copy in the image store."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import orjson
from starlette.requests import Request

from diffuserve.api.image_store import ImageStore, Reservation, StoreFull
from diffuserve.api.public_url import base_url
from diffuserve.config import Settings
from diffuserve.errors import DiffuserveError
from diffuserve.protocol import ImageData, ImagesResponse
from diffuserve.protocol.usage import usage_for
from diffuserve.types import EncodedImage, GenerationRequest, ModelInfo

CONTENT_PATH = "/v1/images/{image_id}/content"


def store_full(exc: StoreFull, store: ImageStore) -> DiffuserveError:
    """507 Insufficient Storage: the store cannot keep the images without deleting images whose URLs are still
    valid."""
    error = DiffuserveError(
        f"the image store has no room for these images ({exc.needed} bytes, {max(exc.free, 0)} free of "
        f"{store.max_bytes}) until older image URLs expire (at most {store.ttl_seconds:g} s); ask for "
        "response_format 'b64_json', or retry later",
        code="image_store_full",
    )
    error.status = 507
    return error


def image_store_of(request: Request) -> ImageStore:
    store: ImageStore = request.app.state.image_store
    return store


def content_url(base: str, image_id: str) -> str:
    return base + CONTENT_PATH.format(image_id=image_id)


def owner_of(request: Request) -> str:
    """The tag of the API key of the request: an image URL answers only to the key that made it."""
    return str(request.app.state.auth.owner_tag(request.headers.get("authorization")))


async def reserve_room(request: Request, generation: GenerationRequest) -> Reservation:
    """Room in the image store for a `url` answer, before it is generated: a full store is a 507 now, not after
    the work is done."""
    store = image_store_of(request)
    media_type = f"image/{generation.output_format}"
    try:
        return await store.reserve(generation.n, generation.width * generation.height, media_type)
    except StoreFull as exc:
        raise store_full(exc, store) from None


def b64_image_data(images: Sequence[EncodedImage]) -> list[ImageData]:
    return [
        ImageData(b64_json=base64.b64encode(image.data).decode("ascii"), seed=image.seed) for image in images
    ]


def answer_body(
    model: ModelInfo,
    generation: GenerationRequest,
    quality: str | None,
    data: list[ImageData],
    text_tokens: int,
) -> bytes:
    """The JSON answer of an images request (orjson: a few MB of base64 serialise in about a millisecond,
    several times faster than json)."""
    payload = ImagesResponse(
        data=data,
        model=model.name,
        output_format=generation.output_format,
        size=f"{generation.width}x{generation.height}",
        quality=quality or "auto",
        usage=usage_for(generation, model, text_tokens),
    )
    return orjson.dumps(payload.model_dump())


async def image_data(
    request: Request,
    images: Sequence[EncodedImage],
    response_format: str | None,
    reservation: Reservation | None = None,
) -> list[ImageData]:
    """One entry per image, in order, each with its seed. `response_format` "url": the images go to the image
    store (in `reservation`'s room) and each entry has `url`, an absolute link to `GET /v1/images/{id}/content`
    (PUBLIC_URL, else the request's forwarded or Host headers) valid for IMAGE_URL_TTL_SECONDS to the same API
    key; anything else: `b64_json`."""
    if response_format != "url":
        return b64_image_data(images)
    settings: Settings = request.app.state.settings
    # Before storing anything: a malformed forwarded header is the client's 400, and no file is left behind.
    base = base_url(request, settings.public_url)
    return await stored_image_data(image_store_of(request), images, owner_of(request), base, reservation)


async def stored_image_data(
    store: ImageStore,
    images: Sequence[EncodedImage],
    owner: str,
    base: str,
    reservation: Reservation | None = None,
) -> list[ImageData]:
    """The images put in the store for `owner`, each entry a URL under `base`."""
    try:
        ids = await store.put(images, owner, reservation)
    except StoreFull as exc:
        raise store_full(exc, store) from None
    except OSError as exc:
        raise DiffuserveError(
            f"the image store could not keep the images ({exc.strerror or type(exc).__name__}); "
            "ask for response_format 'b64_json'",
            code="image_store_failed",
        ) from exc
    return [
        ImageData(url=content_url(base, image_id), seed=image.seed)
        for image_id, image in zip(ids, images, strict=True)
    ]
