"""Three model families in one server over the official client (the tiny built-in versions of FLUX.1 Kontext,
Qwen-Image-Edit and SD3.5): each generates at its own defaults, the conditioning edits answer on
/v1/images/edits (a strength sent has no effect there), and a family without an edit pipeline says so."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI
from openai import AsyncOpenAI
from PIL import Image

from tests.inprocess import EDITS, digits_settings, envelope, pixels, served

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODELS = ["tiny-flux-kontext", "tiny-qwen-image-edit", "tiny-sd35"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[FastAPI]:
    settings = digits_settings(models=MODELS, model_batch=2, warmup=False)
    async with served(settings) as app:
        yield app


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


async def test_each_family_is_listed_and_generates_at_its_defaults(
    http: httpx.AsyncClient, client: AsyncOpenAI
) -> None:
    cards = {card["root"]: card for card in (await http.get("/v1/models")).json()["data"]}
    assert [cards[name]["family"] for name in MODELS] == [
        "tiny-flux-kontext",
        "tiny-qwen-image-edit",
        "tiny-sd35-medium",
    ]
    for name in MODELS:
        result = await client.images.generate(
            model=name, prompt="a fox", extra_body={"seed": 1, "num_inference_steps": 2}
        )
        assert result.data is not None
        width, height = (int(side) for side in cards[name]["default_size"].split("x"))
        assert pixels(result.data[0].b64_json).shape == (height, width, 3), name


async def test_conditioning_edits_answer_and_a_family_without_edits_says_so(
    http: httpx.AsyncClient, client: AsyncOpenAI
) -> None:
    picture = _png(64)
    for name in ("tiny-flux-kontext", "tiny-qwen-image-edit"):
        answers = []
        for strength in (0.3, 0.9):
            result = await client.images.edit(
                model=name,
                image=("in.png", picture, "image/png"),
                prompt="make it blue",
                extra_body={
                    "seed": 3,
                    "num_inference_steps": 2,
                    "strength": strength,
                    "output_format": "png",
                },
            )
            assert result.data is not None
            answers.append(pixels(result.data[0].b64_json))
        # The picture conditions every step: the strength changes nothing.
        assert np.array_equal(answers[0], answers[1]), name
    refused = await http.post(
        EDITS,
        data={"model": "tiny-sd35", "prompt": "make it blue"},
        files={"image": ("in.png", picture, "image/png")},
    )
    error = envelope(refused, 400, "invalid_value")
    assert "has no image-to-image pipeline" in error["message"] and error["param"] == "image"
