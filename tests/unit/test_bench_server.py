"""The bench's server helpers: start-up failures reported early and a stop that never raises or leaves a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from diffuserve.bench.server import SpawnedServer, StartError, _startup_failure


def test_startup_failure_reads_only_a_failed_readiness_answer() -> None:
    failed = httpx.Response(503, json={"status": "failed", "error": "worker 0 could not load the model"})
    assert _startup_failure(failed) == "worker 0 could not load the model"
    assert _startup_failure(httpx.Response(503, json={"status": "loading"})) is None
    assert _startup_failure(httpx.Response(503, text="<html>not JSON</html>")) is None  # a proxy's page
    assert _startup_failure(httpx.Response(200, json={"status": "ready"})) is None
    assert _startup_failure(None) is None


def test_a_server_that_exits_at_start_up_is_an_error_with_its_reason(tmp_path: Path) -> None:
    server = SpawnedServer(tmp_path / "server.log", ready_timeout=60, serve_args=["--tier", "bogus"])
    with pytest.raises(StartError) as caught, server:
        pytest.fail("never ready")
    assert caught.value.reason == "`diffuserve serve` exited with code 2 before it was ready"
    assert "bogus" in str(caught.value)  # the log's tail says why
    assert server.process is not None and server.process.returncode == 2


def test_stop_after_the_server_already_exited(tmp_path: Path) -> None:
    # benchmarks/gpu_warmup.py's old killpg raised ProcessLookupError here, hiding the real error.
    server = SpawnedServer(tmp_path / "server.log")
    server.process = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    server.process.wait()
    server.stop()
    server.stop()  # twice is harmless too
