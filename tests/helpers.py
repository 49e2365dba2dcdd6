"""Test helpers: start a real `diffuserve serve` process on a free loopback port and wait for it."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from diffuserve.bench.server import free_port  # re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerHandle:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> dict:
        response = httpx.get(f"{self.base_url}/health/ready", timeout=5)
        return response.json()

    def model_name(self) -> str:
        return str(self.ready()["model"])

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.ready()["workers"] if w["state"] in ("idle", "busy")]


def server_free_env() -> dict[str, str]:
    """This process's environment without any of the server's own settings (MODEL_REPO, API_KEYS …), so a
    variable set on the machine running the tests cannot change the server they start."""
    from diffuserve.config import Settings

    settings_env = {name for names in Settings.env_names().values() for name in names}
    return {k: v for k, v in os.environ.items() if k not in settings_env}


def spawn_server(extra_args: list[str] | None = None, **env: str) -> ServerHandle:
    """Start `diffuserve serve` without waiting; env overrides (e.g. MODEL_BATCH="8") go to the process."""
    port = free_port()
    log_fd, log_name = tempfile.mkstemp(prefix="diffuserve-", suffix=".log")
    full_env = {**server_free_env(), "PORT": str(port), "HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffuserve", "serve", *(extra_args or [])],
        env=full_env,
        stdout=log_fd,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,  # so stopping it also stops its worker processes
    )
    os.close(log_fd)  # the child holds its own copy
    return ServerHandle(process=process, port=port, log_path=Path(log_name))


def wait_ready(handle: ServerHandle, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(f"server exited with {handle.process.returncode}:\n{handle.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{handle.base_url}/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout}s:\n{handle.log()}")


def stop_server(handle: ServerHandle) -> None:
    if handle.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.process.pid, signal.SIGTERM)
        try:
            handle.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle.process.pid, signal.SIGKILL)
            handle.process.wait(timeout=5)
    # Reap any worker left behind in the session group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(handle.process.pid, signal.SIGKILL)


@contextlib.contextmanager
def start_server(
    extra_args: list[str] | None = None, timeout: float = 120.0, **env: str
) -> Iterator[ServerHandle]:
    """A ready server for the duration of the block; always stopped, worker processes included."""
    handle = spawn_server(extra_args, **env)
    try:
        wait_ready(handle, timeout)
        yield handle
    finally:
        stop_server(handle)


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# Process-wide torch._dynamo settings that `configure_compile_cache` changes.
DYNAMO_GLOBALS = ("automatic_dynamic_shapes", "recompile_limit", "accumulated_recompile_limit")


@contextlib.contextmanager
def dynamo_config_restored() -> Iterator[None]:
    """Restore torch._dynamo's config afterwards. Plain assignment, not monkeypatch: its config module serves
    these names through __getattr__, and monkeypatch's undo left them deleted (later compiles then failed)."""
    import torch._dynamo

    config: Any = torch._dynamo.config
    saved = {name: getattr(config, name) for name in DYNAMO_GLOBALS if hasattr(config, name)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
