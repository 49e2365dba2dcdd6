"""The README's grid of the ten digits: generated through a running server's Images API, or by the pipeline."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from diffuserve.models.tokenizer import NUMBER_WORDS
from diffuserve.types import TINY_FLUX


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
