"""Test helpers: a real `diffuserve serve` process on a free loopback port (the bench's SpawnedServer), and
what other tests share (benchmark scripts imported as they run, engines, pixels)."""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from PIL import Image

from diffuserve.bench.server import SpawnedServer
from diffuserve.bench.server import free_port as free_port  # re-exported for the tests
from diffuserve.messages import BatchResult
from diffuserve.types import BatchJob

if TYPE_CHECKING:
    from diffuserve.engine.config import EngineConfig

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


# Process-wide torch._dynamo and inductor settings that `configure_compile_cache` changes.
DYNAMO_GLOBALS = ("automatic_dynamic_shapes", "recompile_limit", "accumulated_recompile_limit")
INDUCTOR_GLOBALS = ("deterministic",)


@contextlib.contextmanager
def dynamo_config_restored() -> Iterator[None]:
    """Restore the torch._dynamo and inductor settings that `configure_compile_cache` changes. Plain
    assignment, not monkeypatch: their config modules serve these names through __getattr__, and monkeypatch's
    undo left them deleted (later compiles then failed)."""
    import torch._dynamo
    import torch._inductor.config

    configs: list[tuple[Any, tuple[str, ...]]] = [
        (torch._dynamo.config, DYNAMO_GLOBALS),
        (torch._inductor.config, INDUCTOR_GLOBALS),
    ]
    saved = [
        (config, {name: getattr(config, name) for name in names if hasattr(config, name)})
        for config, names in configs
    ]
    try:
        yield
    finally:
        for config, values in saved:
            for name, value in values.items():
                setattr(config, name, value)


def process_alive(pid: int) -> bool:
    """Whether `pid` still runs; a zombie has exited (only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_pids(pid: int) -> list[int]:
    """Every process whose parent is `pid` (a server's workers and multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def worker_processes(server_pid: int) -> list[int]:
    """A server's worker processes: its children but multiprocessing's resource tracker."""
    workers = []
    for pid in child_pids(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(pid)
    return workers


def pixels_body(
    seed: int, n: int = 1, steps: int | None = None, prompt: str = "the digit 3"
) -> dict[str, Any]:
    """A request for `n` images of consecutive seeds as PNG (bytes = pixels) in JSON."""
    body: dict[str, Any] = {"prompt": prompt, "seed": seed, "n": n, "output_format": "png"}
    body["response_format"] = "b64_json"
    if steps is not None:
        body["num_inference_steps"] = steps
    return body


def generate_pixels(
    server: ServerHandle, seed: int, n: int = 1, steps: int | None = None, prompt: str = "the digit 3"
) -> list[np.ndarray]:
    """`n` images for consecutive seeds over PNG (bytes = pixels), as int16 arrays ready to subtract."""
    body = pixels_body(seed, n, steps, prompt)
    response = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [
        np.asarray(decode_image(base64.b64decode(d["b64_json"])), dtype=np.int16)
        for d in response.json()["data"]
    ]


def spawn_ranks(world: int, target: Any, *args: Any) -> dict[Any, Any]:
    """Run `target(rank, port, *args, out)` in `world` processes that meet on a free port (a gloo group
    where the target starts one); what they put in the shared dict `out`."""
    import torch.multiprocessing as torch_mp

    out = torch_mp.Manager().dict()
    torch_mp.spawn(target, args=(free_port(), *args, out), nprocs=world)
    return dict(out)


def engine_config(**overrides: Any) -> EngineConfig:
    """An EngineConfig of the built-in digits model, as the server would make it, with `overrides`."""
    from diffuserve.engine.config import EngineConfig

    fields: dict[str, Any] = {"model_repo": "digits", "model_name": "digits", "warmup": False, **overrides}
    return EngineConfig(**fields)


def run_engine(engine: Any, job: BatchJob) -> BatchResult:
    """A batch through the engine and the worker's encoder, as a worker runs it."""
    from diffuserve.serving.image_encoder import BatchEncoder

    computed = engine.compute(job)
    return computed if isinstance(computed, BatchResult) else BatchEncoder().encode_batch(computed)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def bench_script(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[ModuleType]:
    """A script of benchmarks/ as it runs: it imports its siblings by their plain names (`common`), so
    benchmarks/ goes on the path for the test only, and the benchmark modules it brought in leave sys.modules
    after it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    imported_before = set(sys.modules)
    try:
        yield importlib.import_module(name)
    finally:
        for added in set(sys.modules) - imported_before:
            if Path(getattr(sys.modules[added], "__file__", None) or "/").parent == BENCHMARKS:
                sys.modules.pop(added, None)
