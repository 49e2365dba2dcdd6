"""SIGTERM with a generation longer than the drain timeout: readiness and new requests 503 at once, the long
one failed with 503 at the drain timeout, exit code 0 within drain + 5 s, no worker left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from tests.helpers import server_handle

URL = "/v1/images/generations"
DRAIN_S = 2.0
# About 5 s on one CPU core for the digits model: well past the drain timeout.
LONG = {"prompt": "the digit 8", "n": 4, "width": 256, "height": 256, "num_inference_steps": 200}


def test_sigterm_drains_then_fails_the_rest_and_exits_0() -> None:
    handle = server_handle(["--drain-timeout", str(DRAIN_S)], MODEL_BATCH="4")
    try:
        handle.start()
        handle.wait_ready()
        assert handle.process is not None
        worker_pids = handle.worker_pids()
        quick = httpx.post(f"{handle.base_url}{URL}", json={"prompt": "1"}, timeout=30)
        assert quick.status_code == 200

        answers: dict[str, httpx.Response] = {}

        def long_request() -> None:
            answers["long"] = httpx.post(
                f"{handle.base_url}{URL}", json={**LONG, "response_format": "b64_json"}, timeout=60
            )

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.0)  # the batch is running
        signalled = time.monotonic()
        os.kill(handle.process.pid, signal.SIGTERM)  # the server alone, as supervisord stops it
        time.sleep(0.3)
        ready = httpx.get(f"{handle.base_url}/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = httpx.post(f"{handle.base_url}{URL}", json={"prompt": "2"}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"

        thread.join(timeout=DRAIN_S + 10)
        long = answers["long"]
        assert long.status_code == 503, long.text
        assert long.json()["error"]["code"] == "shutting_down"
        assert DRAIN_S - 0.5 <= time.monotonic() - signalled <= DRAIN_S + 2

        code = handle.process.wait(timeout=DRAIN_S + 5)
        assert code == 0, handle.log_tail()
        assert time.monotonic() - signalled <= DRAIN_S + 5
        for pid in worker_pids:
            assert not _alive(pid), f"worker {pid} outlived its server"
        log = handle.log()
        assert "Traceback" not in log and "drain timeout of 2 s passed: failing 1 generation(s)" in log
    finally:
        handle.stop()


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True
