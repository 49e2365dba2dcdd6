"""`stream: true` through the official `openai` SDK: previews from the denoising loop, then the same final
image a plain request gives; each of several concurrent streams in one batch gets its own."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.helpers import ServerHandle, decode_image, generate_pixels, sdk_client, start_server

CONCURRENT_STREAMS = 8
# A lone run and a batched run of the same seed may round differently in the last float bits.
MAX_BATCH_PIXEL_DIFF = 2


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    # A batch window wide enough for eight concurrent streams to share one batch.
    with start_server(MODEL_REPO="digits", MODEL_BATCH="8", BATCH_WAIT_MS="300") as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> OpenAI:
    return sdk_client(server)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_image(base64.b64decode(b64)).convert("RGB"), dtype=np.int16)


def _events(stream: Any) -> list[Any]:
    return list(stream)


def test_a_streamed_generation_sends_previews_then_the_plain_image(
    server: ServerHandle, client: OpenAI
) -> None:
    events = _events(
        client.images.generate(
            model="digits",
            prompt="the digit 6",
            stream=True,
            partial_images=2,
            extra_body={"seed": 42, "output_format": "png"},
        )
    )
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = events[-1]
    assert final.size == "32x32" and final.output_format == "png" and final.background == "opaque"
    assert final.usage.output_tokens == 16 and final.usage.input_tokens_details.text_tokens > 0
    plain = generate_pixels(server, seed=42, prompt="the digit 6")[0]
    assert np.array_equal(_pixels(final.b64_json), plain)
    previews = [_pixels(event.b64_json) for event in events[:2]]
    assert all(p.shape == plain.shape for p in previews)
    # Later previews are nearer the final image.
    assert np.abs(previews[1] - plain).mean() < np.abs(previews[0] - plain).mean()


def test_a_streamed_edit_sends_previews_then_the_plain_edit(client: OpenAI) -> None:
    source = client.images.generate(
        model="digits",
        prompt="the digit 3",
        response_format="b64_json",
        extra_body={"seed": 1, "output_format": "png"},
    )
    assert source.data is not None and source.data[0].b64_json is not None
    picture = base64.b64decode(source.data[0].b64_json)
    arguments: dict[str, Any] = {
        "model": "digits",
        "image": ("three.png", picture, "image/png"),
        "prompt": "the digit 8",
        "extra_body": {"seed": 7, "strength": 1.0, "output_format": "png"},
    }
    events = _events(client.images.edit(stream=True, partial_images=2, **arguments))
    kinds = [event.type for event in events]
    assert kinds == ["image_edit.partial_image"] * 2 + ["image_edit.completed"], kinds
    plain = client.images.edit(**arguments)
    assert plain.data is not None and plain.data[0].b64_json is not None
    assert np.array_equal(_pixels(events[-1].b64_json), _pixels(plain.data[0].b64_json))
    assert events[-1].usage.input_tokens_details.image_tokens == 16


def test_concurrent_streams_in_one_batch_each_get_their_own_previews(server: ServerHandle) -> None:
    async def one(client: AsyncOpenAI, digit: int) -> list[Any]:
        stream = await client.images.generate(
            model="digits",
            prompt=f"the digit {digit}",
            stream=True,
            partial_images=2,
            extra_body={"seed": 100 + digit, "output_format": "png"},
        )
        return [event async for event in stream]

    async def main() -> list[list[Any]]:
        async with AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as c:
            return await asyncio.gather(*(one(c, digit) for digit in range(CONCURRENT_STREAMS)))

    before = _batches_of(server, CONCURRENT_STREAMS)
    streams = asyncio.run(main())
    assert _batches_of(server, CONCURRENT_STREAMS) == before + 1, "the eight streams must share one batch"
    finals = []
    for digit, events in enumerate(streams):
        kinds = [event.type for event in events]
        assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], (
            digit,
            kinds,
        )
        final = _pixels(events[-1].b64_json)
        alone = generate_pixels(server, seed=100 + digit, prompt=f"the digit {digit}")[0]
        assert np.abs(final - alone).max() <= MAX_BATCH_PIXEL_DIFF
        finals.append(final)
    for digit, events in enumerate(streams):
        # Its own previews: each is nearer its own stream's final image than any other stream's.
        for event in events[:2]:
            preview = _pixels(event.b64_json)
            distances = [np.abs(preview - final).mean() for final in finals]
            assert int(np.argmin(distances)) == digit


def _batches_of(server: ServerHandle, size: int) -> float:
    """How many batches of more than 6 and at most `size` images the server has run (its batch-size
    histogram's buckets are 6, 8, 12 …: a batch of eight is the only one of them eight streams can make)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    buckets = {}
    for line in text.splitlines():
        if line.startswith("diffuserve_batch_size_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets[float(size)] - buckets[6.0]


def test_a_client_leaving_mid_stream_frees_its_batch(server: ServerHandle, client: OpenAI) -> None:
    """The stream's first preview comes a quarter of the way through a long run; the client then hangs up and
    the worker stops the batch at its next step instead of finishing it for nobody."""
    stream = client.images.generate(
        model="digits",
        prompt="the digit 2",
        stream=True,
        partial_images=3,
        extra_body={"seed": 9, "num_inference_steps": 200, "output_format": "png"},
    )
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    stream.close()
    deadline = time.monotonic() + 30
    while "stopped after its clients left" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stopped after its clients left" in server.log()
    assert generate_pixels(server, seed=9, prompt="the digit 2")[0].shape == (32, 32, 3)
