"""Test helpers: a real `diffuserve serve` process on a free loopback port (the bench's SpawnedServer)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from diffuserve.bench.server import SpawnedServer
from diffuserve.bench.server import free_port as free_port  # re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent


class ServerHandle(SpawnedServer):
    """The bench's spawned server (its own session, log file, readiness wait, stop) plus what tests ask of it."""

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


def server_handle(extra_args: list[str] | None = None, timeout: float = 120.0, **env: str) -> ServerHandle:
    """A server not started yet; env overrides (e.g. MODEL_BATCH="8") go to the process."""
    log_fd, log_name = tempfile.mkstemp(prefix="diffuserve-", suffix=".log")
    os.close(log_fd)
    return ServerHandle(
        Path(log_name),
        env={"PYTHONUNBUFFERED": "1", **env},
        ready_timeout=timeout,
        serve_args=extra_args or (),
        stop_grace=15.0,
        base_env=server_free_env(),
    )


@contextlib.contextmanager
def start_server(
    extra_args: list[str] | None = None, timeout: float = 120.0, **env: str
) -> Iterator[ServerHandle]:
    """A ready server for the duration of the block; always stopped, worker processes included."""
    with server_handle(extra_args, timeout, **env) as handle:
        yield handle


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
