"""Talking to the benchmarked server outside the load itself: readiness, model list, /metrics, `--spawn-server`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

READY_PATH = "/health/ready"


class ServerError(RuntimeError):
    """The server cannot be benchmarked (unreachable, never ready, or it exited)."""


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


class SpawnedServer:
    """`diffuserve serve` on a free local port for the length of a `with` block; its output goes to a log file."""

    def __init__(
        self,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 300.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = free_port(host)
        self.base_url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SpawnedServer:
        env = {**os.environ, **self.extra_env, "HOST": self.host, "PORT": str(self.port)}
        cmd = [sys.executable, "-m", "diffuserve.cli", "serve", "--host", self.host, "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # Own session: a stop signal reaches the server and the workers it started, nothing else.
            self.process = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise ServerError(
                    f"`diffuserve serve` exited with code {self.process.returncode} before it was ready; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.base_url + READY_PATH, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"spawned server not ready after {self.ready_timeout:g} s; see {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        proc = self.process
        if proc is None:
            return
        # The session holds only what this server started (itself and its workers): signal all of it.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # A worker that outlived its parent would keep a CPU busy after the run.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
