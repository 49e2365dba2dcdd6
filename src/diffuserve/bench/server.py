"""Talking to the benchmarked server outside the load itself: readiness, model list, /metrics, `--spawn-server`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

READY_PATH = "/health/ready"


class ServerError(RuntimeError):
    """The server cannot be benchmarked (unreachable, never ready, or it exited)."""


class StartError(ServerError):
    """A spawned server never became ready; `reason` says why in one line, the message adds its log's tail."""

    def __init__(self, reason: str, log_path: Path, log_tail: str) -> None:
        super().__init__(f"{reason}; last lines of {log_path}:\n{log_tail}")
        self.reason = reason


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def wait_ready(
    base_url: str, timeout: float, api_key: str | None = None, unreachable_grace: float = 5.0
) -> None:
    """Block until GET /health/ready answers 200.

    A server that answers (503: still loading its model) gets the whole `timeout`; one that cannot be reached
    at all is an error after `unreachable_grace` seconds, so a wrong URL fails fast.
    """
    start = time.monotonic()
    answered = False
    while True:
        try:
            response = httpx.get(base_url + READY_PATH, headers=auth_headers(api_key), timeout=5.0)
            if response.status_code == 200:
                return
            answered = True
            last = f"HTTP {response.status_code} from {READY_PATH}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        waited = time.monotonic() - start
        if not answered and waited >= min(unreachable_grace, timeout):
            raise ServerError(f"server at {base_url} is unreachable ({last})")
        if waited >= timeout:
            raise ServerError(f"server at {base_url} not ready after {timeout:g} s ({last})")
        time.sleep(0.25)


def list_models(base_url: str, api_key: str | None = None) -> list[str]:
    response = httpx.get(base_url + "/v1/models", headers=auth_headers(api_key), timeout=10.0)
    if response.status_code != 200:
        raise ServerError(f"GET /v1/models answered HTTP {response.status_code}: {response.text[:200]}")
    return [item["id"] for item in response.json().get("data", [])]


def warm_up(
    base_url: str, path: str, payload: dict[str, Any], headers: dict[str, str], timeout: float
) -> float:
    """Send one request outside the measurement; a refusal (bad model, auth) stops the run with its reason."""
    started = time.perf_counter()
    try:
        response = httpx.post(base_url + path, json=payload, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServerError(f"warm-up request failed: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        try:
            reason = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = response.text[:200]
        raise ServerError(f"warm-up request answered HTTP {response.status_code}: {reason}")
    return time.perf_counter() - started


def fetch_metrics(base_url: str, api_key: str | None = None) -> str | None:
    """The Prometheus text, or None when the server does not expose it (the report then says so)."""
    try:
        response = httpx.get(base_url + "/metrics", headers=auth_headers(api_key), timeout=10.0)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _startup_failure(response: httpx.Response | None) -> str | None:
    """The error a readiness answer reports once start-up has failed for good (`"status": "failed"`)."""
    if response is None or response.status_code == 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("status") != "failed":
        return None
    return str(body.get("error") or "start-up failed")


class SpawnedServer:
    """`diffuserve serve` on a free local port for the length of a `with` block; its output goes to a log file.

    `serve_args` are extra `diffuserve serve` flags; `stop_grace` is how long a stop waits for a clean exit
    (the workers' shutdown) before it kills the server's whole process group. `env` is added to `base_env`
    (this process's environment unless given).
    """

    def __init__(
        self,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 300.0,
        host: str = "127.0.0.1",
        serve_args: Sequence[str] = (),
        stop_grace: float = 20.0,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = free_port(host)
        self.base_url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.base_env = base_env
        self.ready_timeout = ready_timeout
        self.serve_args = list(serve_args)
        self.stop_grace = stop_grace
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SpawnedServer:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def start(self) -> None:
        """Launch the server without waiting for it; `wait_ready` then waits, `stop` always cleans up."""
        base = os.environ if self.base_env is None else self.base_env
        env = {**base, **self.extra_env, "HOST": self.host, "PORT": str(self.port)}
        cmd = [sys.executable, "-m", "diffuserve.cli", "serve", "--host", self.host, "--port", str(self.port)]
        cmd += self.serve_args
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # Own session: a stop signal reaches the server and the workers it started, nothing else.
            self.process = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise StartError(
                    f"`diffuserve serve` exited with code {self.process.returncode} before it was ready",
                    self.log_path,
                    self.log_tail(),
                )
            try:
                response = httpx.get(self.base_url + READY_PATH, timeout=2.0)
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200:
                return
            failure = _startup_failure(response)
            if failure:
                # The server exits after a fatal start-up error; no need to wait for it to say so.
                raise StartError(f"spawned server failed to start: {failure}", self.log_path, self.log_tail())
            if time.monotonic() >= deadline:
                raise StartError(
                    f"spawned server not ready after {self.ready_timeout:g} s", self.log_path, self.log_tail()
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float | None = None) -> None:
        grace = self.stop_grace if grace is None else grace
        proc = self.process
        if proc is None:
            return
        # The session holds only what this server started (itself and its workers): signal all of it.
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        finally:
            # A worker that outlived its parent would keep a CPU busy after the run; and a stop cut short
            # (a signal during the wait) must still leave nothing running.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
