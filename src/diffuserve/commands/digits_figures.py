"""The figures of the digits model in the docs (docs/models.md, docs/api.md): the grid of the ten digits, an
edit's strengths and an inpainting, and a stream's partial images, made through a running server's Images API
with the official openai client (or, for the grid, the pipeline itself)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffuserve.models.tokenizer import NUMBER_WORDS
from diffuserve.types import TINY_FLUX

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


def grid_prompt(digit: int) -> str:
    return f"a handwritten {NUMBER_WORDS[digit]}"


def images_from_api(
    base_url: str, seeds: Sequence[int], api_key: str = "none", model: str = "digits", size: int = 32
) -> list[list[Image.Image]]:
    """rows[seed][digit] from POST /v1/images/generations with the official openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key)
    rows: list[list[Image.Image]] = []
    for seed in seeds:
        row = []
        for digit in range(10):
            response = client.images.generate(
                model=model,
                prompt=grid_prompt(digit),
                n=1,
                response_format="b64_json",
                # PNG: the grid shows the model's pixels, not the artefacts of the default lossy WebP.
                extra_body={"seed": seed, "width": size, "height": size, "output_format": "png"},
            )
            item = response.data[0] if response.data else None
            if item is None or not item.b64_json:
                raise RuntimeError(f"the server returned no image for digit {digit}, seed {seed}")
            image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
            if image.format != "PNG":
                raise RuntimeError(
                    f"asked for PNG, the server sent {image.format} (digit {digit}, seed {seed})"
                )
            row.append(image.convert("RGB"))
        rows.append(row)
    return rows


def images_from_pipeline(seeds: Sequence[int], size: int = 32) -> list[list[Image.Image]]:
    """The same grid without a server: the built-in pipeline with the serving defaults."""
    from diffuserve.models.digits.evaluate import generate_row
    from diffuserve.models.registry import BUILTIN_MODELS

    pipe = BUILTIN_MODELS["digits"]()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for seed in seeds:
        prompts = [grid_prompt(d) for d in range(10)]
        rows.append(generate_row(pipe, prompts, seed=seed, steps=TINY_FLUX.default_steps, size=size))
    return rows


def compose_grid(rows: Sequence[Sequence[Image.Image]], scale: int = 3, gap: int = 4) -> Image.Image:
    """Rows of images on a light-grey sheet, enlarged with nearest-neighbour so pixels stay honest."""
    cell = rows[0][0].width * scale
    cols = max(len(r) for r in rows)
    sheet = Image.new(
        "RGB", (cols * cell + (cols + 1) * gap, len(rows) * cell + (len(rows) + 1) * gap), (200, 200, 200)
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            big = image.resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(big, (gap + c * (cell + gap), gap + r * (cell + gap)))
    return sheet


def write_grid(out: Path, seeds: Sequence[int], base_url: str | None, api_key: str = "none") -> Path:
    rows = images_from_api(base_url, seeds, api_key) if base_url else images_from_pipeline(seeds)
    out.parent.mkdir(parents=True, exist_ok=True)
    compose_grid(rows).save(out)
    return out
