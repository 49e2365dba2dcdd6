"""Worker processes of the app in process (the real worker loop around the stand-in engine) dying or freezing
under a request: a killed worker fails only its requests and is replaced; a frozen one is killed by the
watchdog (readiness 503 meanwhile) and replaced. The API stays up throughout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests import fakes
from tests.helpers import worker_processes
from tests.inprocess import JSON, URL, client_of, sample, served, settings, until

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[FastAPI]:
    """One worker, one image a batch; a batch running twice its expected time (at least 3 s) is hung."""
    app_settings = settings(model_batch=1, watchdog_min_seconds=3.0, watchdog_factor=2.0)
    async with served(app_settings, fakes.FakeEngine) as app:
        yield app


@pytest_asyncio.fixture(loop_scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, timeout=60) as client:
        yield client
    # Each test leaves a ready worker behind for the next.
    await until(
        lambda: app.state.service.ready and not app.state.service.service_for(None).scheduler.in_flight,
        timeout=60,
    )


def worker_pid(app: FastAPI) -> int:
    [worker] = app.state.service.describe_workers()
    return int(worker["pid"])


async def test_killed_worker_fails_only_its_requests_and_is_replaced(
    app: FastAPI, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    restarts_before = sample(app, "diffuserve_worker_restarts_total")
    held = asyncio.create_task(client.post(URL, json={"prompt": f"hold:{tmp_path / 'never'}"}, headers=JSON))
    await until(lambda: app.state.service.service_for(None).scheduler.in_flight)
    victim = worker_pid(app)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    failed = await held
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "worker_crashed"
    assert "Traceback" not in failed.text
    assert time.monotonic() - killed_at < 10, "the request in flight was not failed at once"
    # The API stayed up; the next request waits for the replacement worker and succeeds.
    recovered = await client.post(URL, json={"prompt": "fast", "seed": 2})
    assert recovered.status_code == 200
    assert worker_pid(app) != victim
    assert sample(app, "diffuserve_worker_restarts_total") == restarts_before + 1


async def test_a_frozen_worker_is_killed_and_replaced_and_readiness_says_so(
    app: FastAPI, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="diffuserve")
    kills_before = sample(app, "diffuserve_watchdog_kills_total")
    # A batch done measures the worker's speed: a few milliseconds, so its limit is the 3 s floor.
    assert (await client.post(URL, json={"prompt": "the digit 1", "seed": 1})).status_code == 200
    frozen = worker_pid(app)
    os.kill(frozen, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = await client.post(URL, json={"prompt": "the digit 2", "seed": 2})
        waited = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed by the watchdog, as it should be
            os.kill(frozen, signal.SIGCONT)
    assert response.status_code == 500, response.text
    assert "watchdog" in response.json()["error"]["message"]
    assert 3 <= waited < 10, waited
    assert (await client.get("/health/ready")).status_code == 503
    assert sample(app, "diffuserve_watchdog_kills_total") == kills_before + 1
    deadline = time.monotonic() + 60
    while (await client.get("/health/ready")).status_code != 200:
        assert time.monotonic() < deadline, "no replacement became ready"
        await asyncio.sleep(0.2)
    assert worker_pid(app) != frozen and frozen not in worker_processes(os.getpid())
    assert (await client.post(URL, json={"prompt": "the digit 3", "seed": 3})).status_code == 200
    assert any("is hung" in record.getMessage() for record in caplog.records)
