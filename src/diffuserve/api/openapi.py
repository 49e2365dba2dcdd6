"""The OpenAPI document: the image routes' hand-read bodies declared from their pydantic models, errors as the
OpenAI envelope, served at /openapi.json behind the same auth as the API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from diffuserve.api.deps import require_auth
from diffuserve.protocol import OUTPUT_FORMATS, ErrorResponse, ImageGenerationRequest, ImagesResponse
from diffuserve.protocol.edits import ImageEditRequest

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorResponse, "description": "an error, in OpenAI's envelope"}
}

_IMAGE_BYTES = {"schema": {"type": "string", "format": "binary"}}
# One server-sent event: its name (image_generation.partial_image, …, error) and its JSON payload as text.
_STREAM_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}

# The route reads its body by hand (to bound its size and time), so FastAPI cannot see it: declare it.
IMAGES_ROUTE_DOC: dict[str, Any] = {
    "summary": "Generate images",
    "description": "JSON with base64 images or image URLs when the client asks for JSON (response_format, "
    "or Accept: application/json outside the SDK's raw calls); else the image bytes of one image. With "
    "stream: true, server-sent events: partial images, then one completed event per image.",
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ImageGenerationRequest.model_json_schema()}},
        },
        "responses": {
            "200": {
                "description": "the images",
                "content": {
                    "application/json": {"schema": ImagesResponse.model_json_schema()},
                    **{f"image/{fmt}": _IMAGE_BYTES for fmt in OUTPUT_FORMATS},
                    # OpenAI's image stream events (docs/api.md, Streaming); errors after the start are events too.
                    "text/event-stream": {"schema": _STREAM_EVENT},
                },
            }
        },
    },
}

_EDIT_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "the picture to edit (PNG, JPEG, WebP)",
        },
        "image[]": {"type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": 16},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "PNG; transparent pixels are repainted",
        },
        **{
            name: {"type": "string"}
            for name in ImageEditRequest.model_json_schema()["properties"]
            if name not in ("image", "mask")
        },
    },
}

EDITS_ROUTE_DOC: dict[str, Any] = {
    "summary": "Edit images",
    "description": "Image-to-image, or inpainting with a mask, on the served model; fields as for generations "
    "plus strength (0 < s ≤ 1). A multipart form as OpenAI's SDK sends it, or JSON with images as data URLs.",
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": _EDIT_FORM_SCHEMA},
                "application/json": {"schema": ImageEditRequest.model_json_schema()},
            },
        },
        "responses": IMAGES_ROUTE_DOC["openapi_extra"]["responses"],
    },
}

IMAGE_CONTENT_ROUTE_DOC: dict[str, Any] = {
    "summary": "Download a stored image",
    "description": "The bytes of an image from a response_format 'url' answer, with its Content-Type; 404 "
    "once its id is unknown, expired (IMAGE_URL_TTL_SECONDS) or evicted (IMAGE_STORE_MAX_BYTES).",
    "responses": {
        200: {
            "description": "the image",
            "content": {f"image/{fmt}": _IMAGE_BYTES for fmt in OUTPUT_FORMATS},
        }
    },
}

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_auth)])
# The docs page itself is open (it holds nothing of the server); the document it loads keeps the API's auth.
docs_router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@docs_router.get("/docs")
async def docs_page() -> HTMLResponse:
    """FastAPI's Swagger UI (its script and style from their CDN) over this server's document, by a relative URL
    so that it works behind a prefix. With API keys set the document needs a key, which the page cannot send."""
    return get_swagger_ui_html(openapi_url="openapi.json", title="diffuserve API")
