"""`GET /v1/images/{image_id}/content`: the bytes of an image kept for a `response_format: "url"` answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from diffuserve.api.deps import require_auth
from diffuserve.api.image_data import CONTENT_PATH, image_store_of, owner_of
from diffuserve.api.openapi import IMAGE_CONTENT_ROUTE_DOC
from diffuserve.errors import ImageNotFound
from diffuserve.logs import safe_text

SHOWN_ID_CHARS = 64

router = APIRouter(dependencies=[Depends(require_auth)])


@router.get(CONTENT_PATH, response_class=Response, **IMAGE_CONTENT_ROUTE_DOC)
@router.get("/images/{image_id}/content", response_class=Response, include_in_schema=False)
async def image_content(image_id: str, request: Request) -> Response:
    store = image_store_of(request)
    image = await store.get(image_id, owner_of(request))
    if image is None:
        # Another key's image is as unknown as a missing one: its existence is not for this key to learn.
        raise ImageNotFound(
            f"no image {safe_text(image_id, SHOWN_ID_CHARS)!r}: unknown, made with another API key, or older "
            f"than its {store.ttl_seconds:g} s lifetime",
            param="image_id",
        )
    headers = {
        # The URL is a capability valid until expiry: shared caches must not keep a keyed answer.
        "Cache-Control": f"private, max-age={int(image.expires_in)}",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(content=image.data, media_type=image.media_type, headers=headers)
