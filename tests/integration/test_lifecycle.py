"""A real `diffuserve serve` process: clear start-up failures and their exit codes, workers that die with their
server, and no API key in any worker's environment or command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import (
    ROOT,
    ServerHandle,
    child_pids,
    free_port,
    process_alive,
    start_server,
    worker_processes,
)


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


def test_model_that_cannot_be_pulled_stops_the_server(tmp_path) -> None:
    """A hub id that is not in the cache, with the hub out of reach: the server exits 1 instead of looping."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PORT": str(free_port())}
    result = run_serve("--model-repo", "acme/not-a-model", env=env)
    assert result.returncode == 1
    assert "could not pull the model" in result.stderr
    assert "acme/not-a-model is not (completely) in the hub cache" in result.stderr


def test_a_gpu_asked_of_a_machine_without_one_exits_in_one_line() -> None:
    result = run_serve("--devices", "cuda:0", env={**os.environ, "PORT": str(free_port())})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "diffuserve serve: cuda:0 asked for, but this machine has no NVIDIA GPU; use DEVICES=cpu"
    )
    assert "Traceback" not in result.stderr


def test_a_model_that_cannot_load_fails_in_one_line_without_a_traceback(tmp_path) -> None:
    """A pipeline whose class is not an image pipeline: the worker's exception reaches the log as one line (its
    traceback only at LOG_LEVEL=debug), and the server exits 1 at the first failure instead of starting the
    worker again, while the other model was loading fine."""
    folder = tmp_path / "not-an-image-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        '{"_class_name": "AudioLDM2Pipeline", "_diffusers_version": "0.42.1"}'
    )
    env = {**os.environ, "PORT": str(free_port())}
    result = run_serve("tiny-random", f"broken={folder}", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    failures = [line for line in result.stderr.splitlines() if "could not load the model broken" in line]
    assert len(failures) == 2, result.stderr  # the log's line and the exit message
    assert "AudioLDM2Pipeline" in failures[-1]
    assert "starting a replacement" not in result.stderr
    debug = run_serve("--log-level", "debug", f"broken={folder}", env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def ready_workers(handle: ServerHandle, headers: dict[str, str]) -> list[int]:
    """The pids of the workers that are up (readiness shows pids only to a valid key, where keys are set)."""
    ready = httpx.get(f"{handle.base_url}/health/ready", headers=headers, timeout=5).json()
    return [worker["pid"] for worker in ready["workers"] if worker["state"] in ("idle", "busy")]


def test_no_worker_gets_an_api_key_in_its_environment_or_command_line() -> None:
    """Keys from both env vars and the flag: the server uses them, its workers never see any of them."""
    in_env, in_alias, in_flag = "sk-env-key-never-in-a-worker", "sk-alias-never-in-a-worker", "sk-flag-key-7"
    with start_server(
        ["--api-key", in_flag], DEVICES="cpu,cpu", API_KEYS=in_env, AUTH_TOKEN=in_alias
    ) as handle:
        assert handle.process is not None
        key = {"Authorization": f"Bearer {in_flag}"}
        url = f"{handle.base_url}/v1/models"
        assert httpx.get(url, timeout=5).status_code == 401  # the keys are live: the server checks them
        assert httpx.get(url, headers=key, timeout=5).status_code == 200
        deadline = time.monotonic() + 120
        while len(started := ready_workers(handle, key)) < 2:  # ready means one worker is; wait for both
            assert time.monotonic() < deadline, handle.log_tail()
            time.sleep(0.1)
        workers = worker_processes(handle.process.pid)
        assert sorted(workers) == sorted(started), (workers, started)
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            # What the worker inherited is there to see (the server's other settings), the keys are not.
            assert b"DEVICES=cpu,cpu" in environ and b"spawn_main" in cmdline
            told = b"\0".join(environ) + cmdline
            leaked = [secret for secret in (in_env, in_alias, in_flag) if secret.encode() in told]
            assert not leaked, f"worker {pid} was given {leaked}"


def test_kill_9_of_the_server_leaves_no_worker_alive() -> None:
    """A server killed outright runs no cleanup; its workers must still be gone within 5 s."""
    with start_server(DEVICES="cpu,cpu") as handle:
        assert handle.process is not None
        server_pid = handle.process.pid
        deadline = time.monotonic() + 120
        while len(workers := ready_workers(handle, {})) < 2:  # ready means one worker is; wait for both
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
