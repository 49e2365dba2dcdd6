"""Two models in one server (the built-in digits and tiny-random, each its own CPU worker): both listed, each
request routed by its `model` field or the X-Model-Name header to its own model, an unknown name refused with
the served ones, and batches that never hold two models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI

from diffuserve.models.digits.classifier import load_classifier
from tests.inprocess import URL, digits_settings, envelope, pixels, sample, sdk_of, served

pytestmark = pytest.mark.asyncio(loop_scope="module")

DIGITS, TINY = "digits-xl-bs4", "tiny-random-xl-bs4"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[FastAPI]:
    settings = digits_settings(models=["digits", "tiny-random"], model_batch=4, batch_wait_ms=100.0)
    async with served(settings) as app:
        yield app


def body(seed: int, **extra: object) -> dict[str, object]:
    return {"prompt": "the digit 3", "size": "32x32", "seed": seed, "response_format": "b64_json", **extra}


async def test_both_models_are_listed_with_their_defaults(http: httpx.AsyncClient) -> None:
    listed = (await http.get("/v1/models")).json()["data"]
    assert [(card["id"], card["root"]) for card in listed] == [(DIGITS, "digits"), (TINY, "tiny-random")]
    assert all(card["family"] == "tiny-flux" and card["default_size"] == "32x32" for card in listed)
    one = await http.get("/v1/models/tiny-random")
    assert one.status_code == 200 and one.json()["id"] == TINY
    ready = (await http.get("/health/ready")).json()
    assert [(m["name"], m["status"]) for m in ready["models"]] == [(DIGITS, "ready"), (TINY, "ready")]
    assert {w["model"] for w in ready["workers"]} == {DIGITS, TINY}


async def test_requests_reach_the_model_they_name(app: FastAPI, http: httpx.AsyncClient) -> None:
    async with sdk_of(app) as client:
        by_field = await client.images.with_raw_response.generate(
            model="digits", prompt="the digit 3", size="32x32", response_format="b64_json", extra_body={"seed": 5}
        )  # fmt: skip
    assert by_field.headers["x-model"] == DIGITS
    by_header = await http.post(URL, json=body(5), headers={"X-Model-Name": "tiny-random"})
    assert by_header.status_code == 200 and by_header.headers["x-model"] == TINY
    digit, noise = pixels(by_field.parse().data[0].b64_json), pixels(by_header.json()["data"][0]["b64_json"])  # type: ignore[index]
    # The trained model draws the digit it is asked for; the random one, for the same seed, draws something else.
    ink = 1.0 - digit.mean(axis=2)[None] / 255.0
    assert load_classifier().predict_ink(ink)[0] == 3
    assert np.abs(digit - noise).mean() > 10
    assert sample(app, "diffuserve_images_generated_total", model=DIGITS) >= 1
    assert sample(app, "diffuserve_images_generated_total", model=TINY) >= 1


async def test_an_unknown_model_is_404_naming_the_served_ones(http: httpx.AsyncClient) -> None:
    for response in (
        await http.post(URL, json=body(1, model="sdxl")),
        await http.post(URL, json=body(1), headers={"X-Model-Name": "sdxl"}),
        await http.get("/v1/models/sdxl"),
    ):
        error = envelope(response, 404, "model_not_found")
        assert DIGITS in error["message"] and TINY in error["message"] and error["param"] == "model"


async def test_a_batch_never_holds_two_models(http: httpx.AsyncClient) -> None:
    requests = [body(seed, model="digits") for seed in range(3)] + [
        body(seed, model=TINY) for seed in range(2)
    ]
    answers = await asyncio.gather(*(http.post(URL, json=request) for request in requests))
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    digits, tiny = answers[:3], answers[3:]
    assert all(a.headers["x-model"] == DIGITS and int(a.headers["x-batch-size"]) <= 3 for a in digits)
    assert all(a.headers["x-model"] == TINY and int(a.headers["x-batch-size"]) <= 2 for a in tiny)
    # Each model's seeds give their own model's image, whatever ran beside them.
    alone = await http.post(URL, json=body(0, model=TINY))
    assert np.array_equal(
        pixels(alone.json()["data"][0]["b64_json"]), pixels(tiny[0].json()["data"][0]["b64_json"])
    )
