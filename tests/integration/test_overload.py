"""Backpressure (429 + Retry-After), deadlines (504), client disconnects, and worker death."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServerHandle, start_server

URL = "/v1/images/generations"
# A request that holds the worker for seconds: the built-in model at 256×256 with the most steps allowed
# (about 7.5 s on two idle cores; 12 steps took only 0.6 s, too short to be sure of overlapping).
SLOW = {"prompt": "slow", "size": "256x256", "num_inference_steps": 200, "seed": 1}
FAST = {"prompt": "fast", "num_inference_steps": 1, "seed": 2}


@pytest.fixture(scope="module")
def small_server() -> Iterator[ServerHandle]:
    with start_server(MODEL_BATCH="1", MAX_QUEUE="2", BATCH_WAIT_MS="0") as handle:
        yield handle


def _metric(server: ServerHandle, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def _wait_until_busy(client: httpx.AsyncClient, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = (await client.get("/health/ready")).json()["workers"]
        if any(w["state"] == "busy" for w in workers):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the slow request never started")


def test_full_queue_answers_429_with_retry_after(small_server: ServerHandle) -> None:
    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            slow = asyncio.create_task(client.post(URL, json=SLOW))
            await _wait_until_busy(client)
            queued = [asyncio.create_task(client.post(URL, json={**FAST, "seed": i})) for i in range(2)]
            await asyncio.sleep(0.3)  # let both reach the queue
            rejected = await client.post(URL, json=FAST)
            return list(await asyncio.gather(slow, *queued)), rejected

    served, rejected = asyncio.run(scenario())
    assert rejected.status_code == 429
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in served] == [200, 200, 200]


def test_deadline_answers_504(small_server: ServerHandle) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            slow = asyncio.create_task(client.post(URL, json=SLOW))
            await _wait_until_busy(client)
            started = time.monotonic()
            late = await client.post(URL, json=FAST, headers={"X-Request-Timeout": "0.5"})
            waited = time.monotonic() - started
            return await slow, late, waited

    slow, late, waited = asyncio.run(scenario())
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "deadline_exceeded"
    assert waited < 5
    assert slow.status_code == 200


def test_disconnected_client_is_dropped_before_running(small_server: ServerHandle) -> None:
    images_before = _metric(small_server, "diffuserve_images_generated_total")
    gone_before = _metric(small_server, "diffuserve_requests_total", status="499")

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            slow = asyncio.create_task(client.post(URL, json=SLOW))
            await _wait_until_busy(client)
            # The client gives up and closes while its request still waits behind the slow one (seconds).
            # Any timeout kind: on a loaded machine even sending can be slow.
            with pytest.raises(httpx.TimeoutException):
                await client.post(URL, json=FAST, timeout=1.5)
            return await slow

    assert asyncio.run(scenario()).status_code == 200
    deadline = time.monotonic() + 5
    while _metric(small_server, "diffuserve_requests_total", status="499") == gone_before:
        assert time.monotonic() < deadline, "the disconnect was never noticed"
        time.sleep(0.1)
    time.sleep(0.5)  # had the dropped request run, its image would be counted by now
    assert _metric(small_server, "diffuserve_images_generated_total") == images_before + 1


def test_killed_worker_fails_only_its_requests_and_is_replaced(small_server: ServerHandle) -> None:
    restarts_before = _metric(small_server, "diffuserve_worker_restarts_total")

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            slow = asyncio.create_task(client.post(URL, json=SLOW))
            await _wait_until_busy(client)
            for pid in small_server.worker_pids():
                os.kill(pid, signal.SIGKILL)
            return await slow

    started = time.monotonic()
    failed = asyncio.run(scenario())
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "worker_crashed"
    assert "Traceback" not in failed.text
    assert time.monotonic() - started < 10, "in-flight request was not failed at once"
    # The API stayed up; the next request waits for the replacement worker and succeeds.
    recovered = httpx.post(f"{small_server.base_url}{URL}", json=FAST, timeout=120)
    assert recovered.status_code == 200
    assert _metric(small_server, "diffuserve_worker_restarts_total") == restarts_before + 1
