"""The `data` entries of an images answer: each image as base64, or as a URL of its copy in the image store."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from starlette.requests import Request

from diffuserve.api.image_store import ImageStore
from diffuserve.api.public_url import base_url
from diffuserve.config import Settings
from diffuserve.errors import DiffuserveError
from diffuserve.protocol import ImageData
from diffuserve.types import EncodedImage

CONTENT_PATH = "/v1/images/{image_id}/content"


def image_store_of(request: Request) -> ImageStore:
    store: ImageStore = request.app.state.image_store
    return store


def content_url(base: str, image_id: str) -> str:
    return base + CONTENT_PATH.format(image_id=image_id)


async def image_data(
    request: Request, images: Sequence[EncodedImage], response_format: str | None
) -> list[ImageData]:
    """One entry per image, in order, each with its seed. `response_format` "url": the images go to the image
    store and each entry has `url`, an absolute link to `GET /v1/images/{id}/content` (PUBLIC_URL, else the
    request's forwarded or Host headers) valid for IMAGE_URL_TTL_SECONDS; anything else: `b64_json`."""
    if response_format != "url":
        return [
            ImageData(b64_json=base64.b64encode(image.data).decode("ascii"), seed=image.seed)
            for image in images
        ]
    settings: Settings = request.app.state.settings
    # Before storing anything: a malformed forwarded header is the client's 400, and no file is left behind.
    base = base_url(request, settings.public_url)
    try:
        ids = await image_store_of(request).put(images)
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
