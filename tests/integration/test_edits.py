"""Image edits through the official `openai` SDK on the built-in digits model, served in process: image-to-image
follows the prompt as far as `strength` lets it, inpainting changes only what the mask opens, and the JSON form
agrees."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI
from openai import AsyncOpenAI
from PIL import Image

from diffuserve.models.digits.classifier import DigitClassifier, load_classifier
from tests.helpers import decode_image
from tests.inprocess import EDITS, digits_settings, generate_pixels, pixels, served

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEEDS = range(20)
# The kept half of an inpainted image is the source's own pixels; a lossless PNG carries them exactly.
KEPT_PIXEL_TOLERANCE = 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[FastAPI]:
    async with served(digits_settings()) as app:
        yield app


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return load_classifier()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def three(http: httpx.AsyncClient, classifier: DigitClassifier) -> bytes:
    """A generated 3 as PNG bytes (the first seed the classifier reads as 3)."""
    for seed in range(10):
        drawn = (await generate_pixels(http, seed=seed, prompt="the digit 3"))[0].astype(np.uint8)
        if classifier.predict_images([Image.fromarray(drawn)])[0] == 3:
            return _png(drawn)
    raise AssertionError("the digits model drew no 3 in ten seeds")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def _edit(client: AsyncOpenAI, image: bytes, strength: float, seed: int, **extra: object) -> np.ndarray:
    result = await client.images.edit(
        model="digits",
        image=("three.png", image, "image/png"),
        prompt="the digit 8",
        extra_body={"strength": strength, "seed": seed, "output_format": "png", **extra},
    )
    assert result.data is not None and len(result.data) == 1
    return pixels(result.data[0].b64_json)


def _reads(classifier: DigitClassifier, images: list[np.ndarray]) -> np.ndarray:
    return classifier.predict_images([Image.fromarray(image.astype(np.uint8)) for image in images])


async def test_a_strong_edit_follows_the_prompt(
    client: AsyncOpenAI, three: bytes, classifier: DigitClassifier
) -> None:
    read = _reads(classifier, [await _edit(client, three, 0.9, seed) for seed in SEEDS])
    assert (read == 8).mean() >= 0.8, read


async def test_a_light_edit_keeps_the_picture(
    client: AsyncOpenAI, three: bytes, classifier: DigitClassifier
) -> None:
    read = _reads(classifier, [await _edit(client, three, 0.2, seed) for seed in SEEDS])
    assert (read == 3).mean() >= 0.8, read


async def test_inpainting_changes_only_what_the_mask_opens(client: AsyncOpenAI, three: bytes) -> None:
    source = np.asarray(decode_image(three).convert("RGB"), dtype=np.int16)
    height, width = source.shape[:2]
    alpha = np.full((height, width), 255, dtype=np.uint8)
    alpha[:, width // 2 :] = 0  # transparent right half: repaint it
    mask = io.BytesIO()
    Image.fromarray(np.dstack([np.zeros((height, width, 3), np.uint8), alpha]), "RGBA").save(
        mask, format="PNG"
    )
    changed = []
    for seed in range(4):
        result = await client.images.edit(
            model="digits",
            image=("three.png", three, "image/png"),
            mask=("mask.png", mask.getvalue(), "image/png"),
            prompt="the digit 8",
            extra_body={"strength": 1.0, "seed": seed, "output_format": "png"},
        )
        assert result.data is not None
        edited = pixels(result.data[0].b64_json)
        assert edited.shape == source.shape
        assert np.abs(edited[:, : width // 2] - source[:, : width // 2]).max() <= KEPT_PIXEL_TOLERANCE
        changed.append(np.abs(edited[:, width // 2 :] - source[:, width // 2 :]).mean())
    assert max(changed) > 5, "the masked half must be repainted"


async def test_the_json_form_with_data_urls_gives_the_same_image(
    http: httpx.AsyncClient, client: AsyncOpenAI, three: bytes
) -> None:
    body = {
        "model": "digits",
        "prompt": "the digit 8",
        "images": [{"image_url": "data:image/png;base64," + base64.b64encode(three).decode()}],
        "strength": 0.9,
        "seed": 5,
        "output_format": "png",
        "response_format": "b64_json",
    }
    response = await http.post(EDITS, json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert np.array_equal(pixels(payload["data"][0]["b64_json"]), await _edit(client, three, 0.9, 5))
    assert payload["size"] == "32x32" and payload["output_format"] == "png"
    usage = payload["usage"]
    # digits: a 4× VAE and FLUX's 2×2 packing make 8×8-pixel tokens: 16 per 32×32 picture, in and out.
    assert usage["input_tokens_details"]["image_tokens"] == 16 and usage["output_tokens"] == 16
    assert usage["input_tokens_details"]["text_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_several_pictures_are_edited_in_turn(client: AsyncOpenAI, three: bytes) -> None:
    blank = _png(np.full((32, 32, 3), 0, dtype=np.uint8))
    result = await client.images.edit(
        model="digits",
        image=[("a.png", three, "image/png"), ("b.png", blank, "image/png")],
        prompt="the digit 8",
        n=2,
        extra_body={"strength": 0.2, "seed": 11, "output_format": "png"},
    )
    assert result.data is not None and len(result.data) == 2
    first, second = (pixels(item.b64_json) for item in result.data)
    # Output i starts from picture i mod 2: the second stays near black, the first keeps the 3's ink.
    assert second.mean() < first.mean()


async def test_an_edit_can_answer_with_urls(
    http: httpx.AsyncClient, client: AsyncOpenAI, three: bytes
) -> None:
    arguments: dict = {
        "model": "digits",
        "image": ("three.png", three, "image/png"),
        "prompt": "the digit 8",
        "extra_body": {"strength": 0.9, "seed": 3, "output_format": "png"},
    }
    linked = await client.images.edit(response_format="url", **arguments)
    inline = await client.images.edit(response_format="b64_json", **arguments)
    assert linked.data is not None and inline.data is not None and linked.data[0].url is not None
    downloaded = await http.get(linked.data[0].url)
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    assert downloaded.content == base64.b64decode(inline.data[0].b64_json or "")
