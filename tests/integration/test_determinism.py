"""A seed gives the same image every time, alone or inside a batch."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np

from tests.helpers import ServerHandle, decode_image, generate_pixels

# Batched matmuls may round differently from unbatched ones in the last float bits; after 8-bit
# quantisation that can flip a pixel value by one. We allow at most 2/255 on any pixel, 0.05 on average.
MAX_PIXEL_DIFF = 2
MAX_MEAN_DIFF = 0.05


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a - b)
    assert diff.max() <= MAX_PIXEL_DIFF, f"max pixel diff {diff.max()}"
    assert diff.mean() <= MAX_MEAN_DIFF, f"mean pixel diff {diff.mean()}"


def test_same_seed_same_image(server: ServerHandle) -> None:
    first = generate_pixels(server, 1234)[0]
    second = generate_pixels(server, 1234)[0]
    assert np.array_equal(first, second)


def test_different_seeds_differ(server: ServerHandle) -> None:
    assert not np.array_equal(generate_pixels(server, 1)[0], generate_pixels(server, 2)[0])


def test_seed_alone_equals_seed_inside_batch_of_four(server: ServerHandle) -> None:
    """n=4 with seed s runs seeds s..s+3 in one batch of 4; each must match its lone run."""
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={
            "prompt": "the digit 3",
            "seed": 700,
            "n": 4,
            "output_format": "png",
            "response_format": "b64_json",
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-batch-size"] == "4"
    batched = [
        np.asarray(decode_image(base64.b64decode(d["b64_json"])), dtype=np.int16)
        for d in response.json()["data"]
    ]
    for offset in range(4):
        alone = generate_pixels(server, 700 + offset)[0]
        _assert_close(alone, batched[offset])


def test_seed_alone_equals_seed_in_a_batch_the_scheduler_formed(server: ServerHandle) -> None:
    """Requests with other prompts and seeds, queued behind a busy worker, share one batch with ours."""
    url = f"{server.base_url}/v1/images/generations"
    ours = {"prompt": "the digit 3", "seed": 900, "output_format": "png", "response_format": "b64_json"}
    others = [{"prompt": f"number {d}", "seed": d, "output_format": "png"} for d in (4, 5, 6)]

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=120) as client:
            # A request of another size holds the worker (about 2 s), so the next four queue and form one batch.
            blocker = asyncio.create_task(
                client.post(url, json={"prompt": "x", "size": "256x256", "num_inference_steps": 60})
            )
            await asyncio.sleep(0.3)
            results = await asyncio.gather(
                client.post(url, json=ours), *(client.post(url, json=body) for body in others)
            )
            assert (await blocker).status_code == 200
            return results[0]

    response = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    assert response.headers["x-batch-size"] == "4", "the four queued requests did not share a batch"
    batched = np.asarray(
        decode_image(base64.b64decode(response.json()["data"][0]["b64_json"])), dtype=np.int16
    )
    alone = generate_pixels(server, 900)[0]
    _assert_close(alone, batched)
