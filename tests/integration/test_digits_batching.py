"""Ten concurrent requests for ten digits, batched by the server, each return its own digit."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from diffuserve.models.digits.classifier import DigitClassifier, load_classifier
from diffuserve.models.tokenizer import NUMBER_WORDS
from tests.helpers import ServerHandle, decode_image, start_server

# A lone run and a batched run of the same seed may round differently in the last float bits.
MAX_PIXEL_DIFF = 2


@pytest.fixture(scope="module")
def digits_server() -> Iterator[ServerHandle]:
    # A batch window long enough that the nine requests queued behind the first share batches.
    with start_server(MODEL_REPO="digits", MODEL_BATCH="8", BATCH_WAIT_MS="50") as handle:
        yield handle


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return load_classifier()


def _body(digit: int) -> dict[str, object]:
    # Distinct seed per digit: a scheduler that swaps seeds between requests changes the images.
    return {
        "model": "digits",
        "prompt": f"a handwritten {NUMBER_WORDS[digit]}",
        "seed": 300 + digit,
        "output_format": "png",
        "response_format": "b64_json",
    }


def _image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 1
    return np.asarray(decode_image(base64.b64decode(data[0]["b64_json"])).convert("RGB"), dtype=np.int16)


async def _concurrent(server: ServerHandle) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        return await asyncio.gather(
            *(client.post("/v1/images/generations", json=_body(d)) for d in range(10))
        )


def test_ten_concurrent_digits_each_come_back_as_their_own(
    digits_server: ServerHandle, classifier: DigitClassifier
) -> None:
    responses = asyncio.run(_concurrent(digits_server))
    images = [_image(r) for r in responses]
    batch_sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert max(batch_sizes) > 1, f"no request shared a batch (sizes {batch_sizes}); the test proves nothing"

    # The classifier reads every image as the digit its own request asked for.
    ink = 1.0 - np.stack([im.mean(axis=2) for im in images]) / 255.0
    predicted = classifier.predict_ink(ink)
    assert list(predicted) == list(range(10)), (
        f"prompted 0..9, read {list(predicted)} (batches {batch_sizes})"
    )

    # And each is the image its own prompt and seed give when run alone: nothing was swapped or shared.
    for digit, batched in enumerate(images):
        alone = _image(
            httpx.post(f"{digits_server.base_url}/v1/images/generations", json=_body(digit), timeout=60)
        )
        diff = np.abs(alone - batched)
        assert diff.max() <= MAX_PIXEL_DIFF, f"digit {digit}: batched image differs from its lone run"
