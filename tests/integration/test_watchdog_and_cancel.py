"""A hung worker is replaced by the watchdog (readiness 503 meanwhile), and a batch whose client left stops at
its next step instead of holding the worker."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx

from tests.helpers import start_server, worker_processes


def test_a_frozen_worker_is_killed_and_replaced_and_readiness_says_so() -> None:
    with start_server(MODEL_BATCH="1", WATCHDOG_MIN_SECONDS="3", WATCHDOG_FACTOR="2") as server:
        url = f"{server.base_url}/v1/images/generations"
        assert httpx.post(url, json={"prompt": "the digit 1", "seed": 1}, timeout=60).status_code == 200
        [frozen] = worker_processes(server.process.pid)
        os.kill(frozen, signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = httpx.post(url, json={"prompt": "the digit 2", "seed": 2}, timeout=60)
            waited = time.monotonic() - started
        finally:
            with contextlib.suppress(ProcessLookupError):  # killed by the watchdog, as it should be
                os.kill(frozen, signal.SIGCONT)
        assert response.status_code == 500, response.text
        assert "watchdog" in response.json()["error"]["message"]
        assert 3 <= waited < 10, waited
        assert httpx.get(f"{server.base_url}/health/ready", timeout=5).status_code == 503
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=5).text
        assert "diffuserve_watchdog_kills_total 1.0" in metrics
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.base_url}/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "no replacement became ready"
            time.sleep(0.2)
        assert frozen not in worker_processes(server.process.pid)
        assert httpx.post(url, json={"prompt": "the digit 3", "seed": 3}, timeout=60).status_code == 200
        assert "is hung" in server.log()


def test_a_batch_whose_client_left_stops_and_frees_the_worker() -> None:
    with start_server(MODEL_BATCH="1") as server:
        url = f"{server.base_url}/v1/images/generations"
        costly = {"prompt": "the digit 8", "seed": 8, "size": "256x256", "num_inference_steps": 200}
        # How long the costly request takes in full, measured on this machine.
        started = time.monotonic()
        assert httpx.post(url, json={**costly, "num_inference_steps": 50}, timeout=120).status_code == 200
        per_step = (time.monotonic() - started) / 50

        def leave_early() -> None:
            with contextlib.suppress(httpx.TimeoutException):  # the client hangs up after 1 s
                httpx.post(url, json=costly, timeout=1.0)

        client = threading.Thread(target=leave_early)
        client.start()
        client.join()
        started = time.monotonic()
        tiny = httpx.post(url, json={"prompt": "the digit 1", "seed": 1}, timeout=120)
        waited = time.monotonic() - started
        assert tiny.status_code == 200
        remaining = 200 * per_step - 1.0
        # Without cancellation the tiny request would wait for the rest of the 200 steps.
        assert waited < max(2.0, remaining / 3), (waited, remaining)
        assert "stopped after its clients left" in server.log()
