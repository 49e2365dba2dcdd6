"""Readiness while loading, clear start-up failures, bearer tokens, workers that die with their server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.helpers import ROOT, child_pids, free_port, process_alive, server_handle, start_server

URL = "/v1/images/generations"


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`diffuserve serve ARGS` to completion (these cases must exit on their own)."""
    return subprocess.run(
        [sys.executable, "-m", "diffuserve", "serve", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env,
    )


def test_ready_is_503_while_loading_then_200_and_auth_applies() -> None:
    handle = server_handle(API_KEYS="key-one,key-two")
    try:
        handle.start()
        first_status = None
        deadline = time.monotonic() + 30
        while first_status is None and time.monotonic() < deadline:
            try:
                first_status = httpx.get(f"{handle.base_url}/health/ready", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.05)
        early = httpx.post(
            f"{handle.base_url}{URL}",
            json={"prompt": "x"},
            headers={"Authorization": "Bearer key-one"},
            timeout=5,
        )
        assert first_status == 503, "readiness must be 503 before the worker has loaded"
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "model_not_ready"
        handle.wait_ready()
        assert httpx.get(f"{handle.base_url}/v2/health/ready", timeout=5).status_code == 200

        # Health needs no key; everything else does.
        assert httpx.get(f"{handle.base_url}/health/live", timeout=5).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"}):
            response = httpx.get(f"{handle.base_url}/v1/models", headers=headers, timeout=5)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{handle.base_url}/metrics", timeout=5).status_code == 401
        assert httpx.post(f"{handle.base_url}{URL}", json={"prompt": "x"}, timeout=5).status_code == 401
        for key in ("key-one", "key-two"):
            ok = httpx.post(
                f"{handle.base_url}{URL}",
                json={"prompt": "x"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert ok.status_code == 200
    finally:
        handle.stop()


def test_missing_local_model_exits_nonzero_with_message(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    result = run_serve("--model-repo", str(missing))
    assert result.returncode != 0
    assert "does not exist" in result.stderr
    assert str(missing) in result.stderr


def test_folder_that_is_not_a_pipeline_exits_nonzero(tmp_path) -> None:
    result = run_serve("--model-repo", str(tmp_path))
    assert result.returncode != 0
    assert "model_index.json" in result.stderr


def test_bad_setting_exits_nonzero() -> None:
    result = run_serve("--model-size", "XXL")
    assert result.returncode == 2
    assert "MODEL_SIZE" in result.stderr


def test_model_that_fails_to_load_in_the_worker_stops_the_server(tmp_path) -> None:
    """A hub id that cannot be fetched fails inside the worker; the server exits 1 instead of looping."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PORT": str(free_port())}
    result = run_serve("--model-repo", "acme/not-a-model", env=env)
    assert result.returncode == 1
    assert "could not load the model" in result.stderr
    assert "acme/not-a-model" in result.stderr


def test_kill_9_of_the_server_leaves_no_worker_alive() -> None:
    """A server killed outright runs no cleanup; its workers must still be gone within 5 s."""
    with start_server(DEVICES="cpu,cpu") as handle:
        assert handle.process is not None
        server_pid = handle.process.pid
        deadline = time.monotonic() + 120
        while len(workers := handle.worker_pids()) < 2:  # ready means one worker is; wait for both
            assert time.monotonic() < deadline, handle.log_tail()
            time.sleep(0.1)
        children = child_pids(server_pid)
        assert len(workers) == 2 and set(workers) <= set(children), (workers, children)

        os.kill(server_pid, signal.SIGKILL)
        handle.process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while (alive := [pid for pid in children if process_alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, f"still running 5 s after the server was killed: {alive}\n{handle.log_tail()}"
