"""Killing one rank of a worker group during a batch: its batch fails at once, no rank of the group survives,
and a new group serves again (shared by the CPU and the GPU group tests)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.helpers import ServerHandle, process_alive

URL = "/v1/images/generations"


def until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def kill_rank_during_batch(
    server: ServerHandle,
    victim: int,
    body: dict[str, Any],
    *,
    requests: int = 1,
    kill_after: float = 0.3,
    fail_within: float = 10.0,
    replaced_within: float = 120.0,
) -> None:
    """Send `requests` copies of `body` at once, SIGKILL rank `victim` `kill_after` s into the first batch, and
    check: every request returns (none hangs), the batch in flight gets a 500 within `fail_within` s, the old
    ranks are all gone, and a new group becomes ready and has been counted as a restart."""
    (worker,) = server.ready()["workers"]
    old_pids = worker["pids"]
    restarts_before = worker_restarts(server)
    answers: list[tuple[int, float]] = []
    lock = threading.Lock()

    def send() -> None:
        response = httpx.post(f"{server.base_url}{URL}", json=body, timeout=replaced_within + 60)
        with lock:
            answers.append((response.status_code, time.monotonic()))

    threads = [threading.Thread(target=send) for _ in range(requests)]
    for thread in threads:
        thread.start()
    until(lambda: server.ready()["workers"][0]["state"] == "busy", 30, "the batch never started")
    time.sleep(kill_after)  # inside the denoising loop, where the ranks meet in collectives at every block
    killed_at = time.monotonic()
    os.kill(old_pids[victim], signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=replaced_within + 90)
    assert not any(thread.is_alive() for thread in threads), "a request hung after a rank died"
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) <= {200, 500}, statuses
    failures = [at - killed_at for status, at in answers if status == 500]
    assert failures, f"no request failed after the kill: {statuses}"
    assert min(failures) < fail_within, f"the batch failed {min(failures):.1f} s after the kill"

    until(lambda: not any(process_alive(pid) for pid in old_pids), 10, f"ranks left alive: {old_pids}")
    until(lambda: _new_group_ready(server, old_pids), replaced_within, "no replacement group became ready")
    assert worker_restarts(server) >= restarts_before + 1
    assert server.ready()["workers"][0]["restarts"] >= worker["restarts"] + 1


def worker_restarts(server: ServerHandle) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    match = re.search(r"^diffuserve_worker_restarts_total (\S+)$", text, re.M)
    assert match is not None, "no diffuserve_worker_restarts_total in /metrics"
    return float(match.group(1))


def _new_group_ready(server: ServerHandle, old_pids: list[int]) -> bool:
    (worker,) = server.ready()["workers"]
    return worker["state"] == "idle" and not set(worker["pids"]) & set(old_pids)
