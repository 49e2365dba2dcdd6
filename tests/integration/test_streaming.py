"""`stream: true` through the official `openai` SDK on the built-in digits model, served in process: previews from
the denoising loop, then the same final image a plain request gives; each of several concurrent streams in one
batch gets its own; a client leaving mid-stream frees its batch."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI
from openai import AsyncOpenAI

from diffuserve.messages import BatchResult
from tests.inprocess import (
    URL,
    Exchange,
    digits_settings,
    generate_pixels,
    pixels,
    served,
    until,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONCURRENT_STREAMS = 8
# A lone run and a batched run of the same seed may round differently in the last float bits.
MAX_BATCH_PIXEL_DIFF = 2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[FastAPI]:
    # A batch window wide enough for eight concurrent streams to share one batch.
    async with served(digits_settings(batch_wait_ms=300.0)) as app:
        yield app


async def _events(stream: Any) -> list[Any]:
    return [event async for event in await stream]


async def test_a_streamed_generation_sends_previews_then_the_plain_image(
    http: httpx.AsyncClient, client: AsyncOpenAI
) -> None:
    events = await _events(
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
    plain = (await generate_pixels(http, seed=42, prompt="the digit 6"))[0]
    assert np.array_equal(pixels(final.b64_json), plain)
    previews = [pixels(event.b64_json) for event in events[:2]]
    assert all(p.shape == plain.shape for p in previews)
    # Later previews are nearer the final image.
    assert np.abs(previews[1] - plain).mean() < np.abs(previews[0] - plain).mean()


async def test_a_streamed_edit_sends_previews_then_the_plain_edit(client: AsyncOpenAI) -> None:
    source = await client.images.generate(
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
    events = await _events(client.images.edit(stream=True, partial_images=2, **arguments))
    kinds = [event.type for event in events]
    assert kinds == ["image_edit.partial_image"] * 2 + ["image_edit.completed"], kinds
    plain = await client.images.edit(**arguments)
    assert plain.data is not None and plain.data[0].b64_json is not None
    assert np.array_equal(pixels(events[-1].b64_json), pixels(plain.data[0].b64_json))
    assert events[-1].usage.input_tokens_details.image_tokens == 16


async def test_concurrent_streams_in_one_batch_each_get_their_own_previews(
    http: httpx.AsyncClient, client: AsyncOpenAI
) -> None:
    async def one(digit: int) -> list[Any]:
        stream = client.images.generate(
            model="digits",
            prompt=f"the digit {digit}",
            stream=True,
            partial_images=2,
            extra_body={"seed": 100 + digit, "output_format": "png"},
        )
        return await _events(stream)

    before = await _batches_of(http, CONCURRENT_STREAMS)
    streams = await asyncio.gather(*(one(digit) for digit in range(CONCURRENT_STREAMS)))
    assert await _batches_of(http, CONCURRENT_STREAMS) == before + 1, "the eight streams must share one batch"
    finals = []
    for digit, events in enumerate(streams):
        kinds = [event.type for event in events]
        assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], (
            digit,
            kinds,
        )
        final = pixels(events[-1].b64_json)
        alone = (await generate_pixels(http, seed=100 + digit, prompt=f"the digit {digit}"))[0]
        assert np.abs(final - alone).max() <= MAX_BATCH_PIXEL_DIFF
        finals.append(final)
    for digit, events in enumerate(streams):
        # Its own previews: each is nearer its own stream's final image than any other stream's.
        for event in events[:2]:
            preview = pixels(event.b64_json)
            distances = [np.abs(preview - final).mean() for final in finals]
            assert int(np.argmin(distances)) == digit


async def _batches_of(http: httpx.AsyncClient, size: int) -> float:
    """How many batches of more than 6 and at most `size` images the app has run (its batch-size histogram's
    buckets are 6, 8, 12 …: a batch of seven or eight is the only one of them eight streams can make)."""
    text = (await http.get("/metrics")).text
    buckets = {}
    for line in text.splitlines():
        if line.startswith("diffuserve_batch_size_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets[float(size)] - buckets[6.0]


async def test_a_client_leaving_mid_stream_frees_its_batch(
    app: FastAPI, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream's first preview comes a quarter of the way through a long run; the client then hangs up and
    the worker stops the batch at its next step instead of finishing it for nobody."""
    scheduler = app.state.service.service_for(None).scheduler
    finished: list[BatchResult] = []
    batch_finished = scheduler.batch_finished

    def spy(worker: object, result: BatchResult) -> None:
        finished.append(result)
        batch_finished(worker, result)

    monkeypatch.setattr(scheduler, "batch_finished", spy)
    body = {
        "model": "digits",
        "prompt": "the digit 2",
        "stream": True,
        "partial_images": 3,
        "seed": 9,
        # 150 steps of 256x256 after the first preview: seconds for the hang-up to reach the worker.
        "size": "256x256",
        "num_inference_steps": 200,
        "output_format": "png",
    }
    stream = Exchange(app, URL, body)
    call = stream.start()
    await until(lambda: b"\n\n" in stream.body, timeout=60)  # the first event is out
    assert stream.status == 200
    assert re.findall(rb"^event: (\S+)$", stream.body, re.M)[0] == b"image_generation.partial_image"
    stream.hang_up.set()
    await asyncio.wait_for(call, 30)
    await until(lambda: finished, timeout=30)
    assert [result.error for result in finished] == ["cancelled: every client of this batch left"]
    assert (await generate_pixels(http, seed=9, prompt="the digit 2"))[0].shape == (32, 32, 3)
