"""The README's edit and preview figures, made through a running server's Images API with the official
openai client: edits of a generated 3 at rising strength and an inpainting, and a stream's partial images."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

EDIT_STRENGTHS = (0.2, 0.6, 0.9)
PREVIEW_STEPS = 8
PREVIEWS = 3


def _client(base_url: str, api_key: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key)


def _image(b64: str | None) -> Image.Image:
    if not b64:
        raise RuntimeError("the server returned no image")
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def left_half_mask(width: int, height: int) -> bytes:
    """An OpenAI mask: opaque where the picture is kept, transparent (alpha 0) on the left half, where a 3
    and an 8 differ."""
    alpha = np.full((height, width), 255, dtype=np.uint8)
    alpha[:, : width // 2] = 0
    rgba = np.dstack([np.zeros((height, width, 3), np.uint8), alpha])
    return _png(Image.fromarray(rgba, "RGBA"))


def edit_rows(base_url: str, seeds: Sequence[int], api_key: str = "none") -> list[list[Image.Image]]:
    """Per seed: a generated 3; "the digit 8" at each of EDIT_STRENGTHS; the 3 with its left half repainted."""
    client = _client(base_url, api_key)
    rows = []
    for seed in seeds:
        generated = client.images.generate(
            model="digits", prompt="the digit 3", extra_body={"seed": seed, "output_format": "png"},
            response_format="b64_json",
        )  # fmt: skip
        source = _image(generated.data[0].b64_json if generated.data else None)
        picture = ("three.png", _png(source), "image/png")
        row = [source]
        for strength in EDIT_STRENGTHS:
            edited = client.images.edit(
                model="digits", image=picture, prompt="the digit 8",
                extra_body={"strength": strength, "seed": seed, "output_format": "png"},
            )  # fmt: skip
            row.append(_image(edited.data[0].b64_json if edited.data else None))
        inpainted = client.images.edit(
            model="digits", image=picture, prompt="the digit 8",
            mask=("mask.png", left_half_mask(*source.size), "image/png"),
            extra_body={"strength": 1.0, "seed": seed, "output_format": "png"},
        )  # fmt: skip
        row.append(_image(inpainted.data[0].b64_json if inpainted.data else None))
        rows.append(row)
    return rows


def preview_rows(base_url: str, digits: Sequence[int], api_key: str = "none") -> list[list[Image.Image]]:
    """Per digit: the PREVIEWS partial images of a streamed generation, then its final image."""
    client = _client(base_url, api_key)
    rows = []
    for digit in digits:
        stream = client.images.generate(
            model="digits", prompt=f"the digit {digit}", stream=True, partial_images=PREVIEWS,
            extra_body={"seed": digit, "num_inference_steps": PREVIEW_STEPS, "output_format": "png"},
        )  # fmt: skip
        rows.append([_image(event.b64_json) for event in stream])
    return rows
