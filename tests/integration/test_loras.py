"""Adapters (LoRA) per request on the built-in digits model, served in process with a real worker: named in the
official SDK's `extra_body` and in multipart edits, listed by `GET /v1/loras`, counted in the metrics, mixed in
one batch without changing any row's image, and every bad adapter a 400 naming its field while the worker keeps
serving."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI
from PIL import Image

from diffuserve.engine.lora.random_adapters import save_random_adapter
from diffuserve.models.digits.lora_evaluate import ASYMMETRIC_DIGITS, measure, mirror_holds
from diffuserve.models.digits.lora_train import MIRROR_WEIGHTS
from diffuserve.models.digits.prompts import eval_prompt
from tests.inprocess import (
    EDITS,
    URL,
    client_of,
    digits_settings,
    envelope,
    pixels,
    sample,
    sdk_of,
    served,
    until,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

# A row batched with others may round differently in the last float bits (see test_generations.py).
MAX_PIXEL_DIFF = 2
MAX_MEAN_DIFF = 0.05
MAX_RANK = 16
BLOCKER = {"prompt": "x", "size": "256x256", "num_inference_steps": 60}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(lora_dir: Path) -> AsyncIterator[FastAPI]:
    settings = digits_settings(
        batch_wait_ms=50.0,
        lora_dir=str(lora_dir),
        lora_max_rank=MAX_RANK,
        loras=[f"mirror={MIRROR_WEIGHTS}"],  # the shipped adapter, read at start (--lora NAME=PATH)
    )
    async with served(settings) as app:
        targets = app.state.service.service_for(None).model.lora_targets
        assert targets, "the digits model lists the layers adapters may change"
        save_random_adapter(lora_dir / "ink.safetensors", targets, rank=8, seed=1, std=0.2)
        save_random_adapter(
            lora_dir / "style" / "pytorch_lora_weights.safetensors", targets, rank=4, seed=2, std=0.2
        )
        save_random_adapter(lora_dir / "wide.safetensors", targets, rank=MAX_RANK * 2, seed=3)
        save_random_adapter(lora_dir / "other-model.safetensors", {"blocks.0.mlp": (5, 7)}, rank=4)
        (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        yield app


@pytest_asyncio.fixture(loop_scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, timeout=120) as client:
        yield client


def body(seed: int, *loras: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"prompt": "the digit 3", "seed": seed, "output_format": "png", "loras": list(loras), **extra}


async def image(client: httpx.AsyncClient, request: dict[str, Any]) -> np.ndarray:
    response = await client.post(URL, json=request)
    assert response.status_code == 200, response.text
    return pixels(response.content)


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MAX_MEAN_DIFF, (diff.max(), diff.mean())


async def test_sdk_extra_body_applies_the_adapter_and_counts_it(app: FastAPI) -> None:
    model = app.state.service.name
    async with sdk_of(app) as sdk:
        plain = await sdk.images.generate(model=model, prompt="the digit 3", extra_body={"seed": 4})
        adapted = await sdk.images.generate(
            model=model,
            prompt="the digit 3",
            extra_body={"seed": 4, "loras": [{"name": "ink", "scale": 1.0}]},
        )
        halved = await sdk.images.generate(
            model=model,
            prompt="the digit 3",
            extra_body={"seed": 4, "loras": [{"name": "ink", "scale": 0.5}]},
        )
    assert plain.data and adapted.data and halved.data
    a, b, c = (pixels(r.data[0].b64_json).astype(int) for r in (plain, adapted, halved))
    assert np.abs(a - b).mean() > 5, "the adapter changed nothing"
    assert 0 < np.abs(a - c).mean() < np.abs(a - b).mean(), "half the scale, a smaller change"
    assert sample(app, "diffuserve_adapter_requests_total", adapter="ink") == 2
    # One worker: the first batch read the file, the second found it in the cache.
    assert sample(app, "diffuserve_adapter_loads_total", adapter="ink") == 1
    assert sample(app, "diffuserve_adapter_cache_hits_total", adapter="ink") >= 1


async def test_the_shipped_mirror_adapter_draws_every_digit_mirrored_also_in_a_mixed_burst(
    app: FastAPI,
) -> None:
    """40 prompts of the digits that look different mirrored, each sent with and without the adapter in one
    burst: the classifier reads the adapted images flipped back as their digit and the plain ones as drawn,
    and each adapted image is the mirror of its plain twin more often than not (lora_evaluate's criterion)."""
    digits = [ASYMMETRIC_DIGITS[i % len(ASYMMETRIC_DIGITS)] for i in range(40)]
    model = app.state.service.name

    async def one(sdk: Any, index: int, loras: list[dict[str, Any]]) -> Image.Image:
        extra = {"seed": 500 + index, "output_format": "png", "loras": loras}
        result = await sdk.images.generate(
            model=model, prompt=eval_prompt(digits[index], index), extra_body=extra
        )
        return Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")

    async with sdk_of(app) as sdk:
        sent = [one(sdk, i, loras) for i in range(len(digits)) for loras in ([], [{"name": "mirror"}])]
        images = await asyncio.gather(*sent)
    base, adapted = images[0::2], images[1::2]
    metrics = measure(base, adapted, digits)
    assert mirror_holds(metrics), metrics
    assert metrics["mirror_accuracy_lora"] >= 0.9 and metrics["direct_accuracy_base"] >= 0.9, metrics


async def test_the_adapters_are_listed_with_the_models_that_take_them(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    listed = {entry["id"]: entry for entry in (await client.get("/v1/loras")).json()["data"]}
    model = app.state.service.name
    assert listed["ink"]["rank"] == 8 and listed["ink"]["models"] == [model]
    assert listed["style"]["rank"] == 4 and listed["style"]["layers"] == listed["ink"]["layers"]
    assert listed["wide"]["models"] == [], "rank 32 is above LORA_MAX_RANK"
    assert listed["other-model"]["models"] == []
    assert "error" in listed["broken"]
    assert listed["mirror"]["rank"] == 4 and listed["mirror"]["models"] == [model], "read at start"


async def test_a_seed_gives_the_same_image_whatever_its_batch_neighbours_use(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    sets: list[list[dict[str, Any]]] = [
        [{"name": "ink"}],
        [],
        [{"name": "style", "scale": 0.7}],
        [{"name": "ink", "scale": 0.5}, {"name": "style"}],
    ]
    requests = [body(100 + i, *sets[i % 4]) for i in range(8)]
    alone = [await image(client, request) for request in requests]
    batches = sample(app, "diffuserve_batch_size_count")
    blocker = asyncio.create_task(client.post(URL, json=BLOCKER))
    await until(lambda: app.state.service.service_for(None).scheduler.in_flight)
    together = await asyncio.gather(*(image(client, request) for request in requests))
    assert (await blocker).status_code == 200
    # The eight queued behind the blocker ran in one batch of four adapter sets (mixed batches, the default).
    assert sample(app, "diffuserve_batch_size_count") - batches == 2
    for single, batched in zip(alone, together, strict=True):
        assert_close(single, batched)
    assert np.abs(alone[0].astype(int) - alone[1].astype(int)).mean() > 1


async def test_multipart_edits_take_loras_as_json_text(client: httpx.AsyncClient) -> None:
    source = await image(client, body(7))
    buffer = io.BytesIO()
    Image.fromarray(source.astype(np.uint8)).save(buffer, format="PNG")
    files = {"image": ("in.png", buffer.getvalue(), "image/png")}
    form = {"prompt": "the digit 3", "seed": "7", "strength": "0.6", "output_format": "png"}
    plain = await client.post(EDITS, data=form, files=files)
    adapted = await client.post(EDITS, data={**form, "loras": '[{"name": "ink"}]'}, files=files)
    assert plain.status_code == adapted.status_code == 200, adapted.text
    assert np.abs(pixels(plain.content).astype(int) - pixels(adapted.content).astype(int)).mean() > 1
    bad = await client.post(EDITS, data={**form, "loras": '[{"name": "nope"}]'}, files=files)
    assert envelope(bad, 400, "invalid_value")["param"] == "loras.0.name"


@pytest.mark.parametrize(
    ("loras", "param", "words"),
    [
        ([{"name": "nope"}], "loras.0.name", "nope"),
        ([{"name": "ink"}, {"name": "other-model"}], "loras.1.name", "another base model"),
        ([{"name": "wide"}], "loras.0.name", "LORA_MAX_RANK"),
        ([{"name": "ink"}, {"name": "ink", "weight_name": None, "scale": 2}], "loras", "twice"),
        ([{"name": "broken"}], "loras.0.name", "broken"),
        ([{"name": "../ink"}], "loras.0.name", "ink"),
        ([{"name": "ink", "scale": 9}], "loras.0.scale", "4"),
        (
            [
                {"name": "style", "scale": 1},
                {"name": "ink"},
                {"name": "style", "weight_name": "x.safetensors"},
            ],
            "loras.2.name",
            "x.safetensors",
        ),
    ],
)
async def test_a_bad_adapter_is_a_400_naming_its_field_and_the_worker_keeps_serving(
    client: httpx.AsyncClient, loras: list[dict[str, Any]], param: str, words: str
) -> None:
    response = await client.post(URL, json=body(1, *loras))
    error = envelope(response, 400, "invalid_value")
    assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error
    assert (await client.post(URL, json=body(1))).status_code == 200


async def test_a_server_without_adapters_refuses_loras() -> None:
    async with served(digits_settings()) as app, client_of(app, timeout=60) as client:
        response = await client.post(URL, json=body(1, {"name": "ink"}))
        error = envelope(response, 400, "invalid_value")
        assert error["param"] == "loras" and "LORA_DIR" in error["message"]
        assert (await client.get("/v1/loras")).json()["data"] == []
