"""diffuserve on Modal: nginx + the model server in one GPU container, opened only once the model is ready.

Usually driven by `diffuserve deploy modal ...`, whose flags arrive here as DIFFUSERVE_MODAL_* variables
(see diffuserve.deploy.modal_plan). It is also a plain Modal app you can copy and edit:

    diffuserve deploy modal --write-app ./modal_app.py      # a copy to edit
    modal run modal_app.py::prefetch                        # weights into the Volume, once
    modal serve modal_app.py                                # temporary dev endpoint (…-dev.modal.run)
    modal deploy modal_app.py                               # persistent endpoint

How a container starts: the `Server` class's enter hook runs start.sh, which renders the nginx/supervisord
configs and becomes supervisord; supervisord starts the model server, and nginx only once /v2/health/ready
answers 200. The hooks wait for both, and Modal routes requests to a container only after its enter hooks
have returned, so no request reaches a container whose model is still loading.

Memory snapshots (https://modal.com/docs/guide/memory-snapshots): with --gpu-snapshot (a Modal alpha) the
start hook runs before the snapshot, with the GPU, and waits until every batch size is warm; Modal then
snapshots the whole process tree, GPU memory included, and later containers resume from it instead of
importing, loading and compiling again. A CPU-only snapshot is not used: Modal takes it without a GPU, and
the start-up worth skipping happens in the spawned GPU worker, which imports torch and loads the weights
itself and needs the GPU to do so.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import modal

from diffuserve.deploy import DEPLOY_DIR
from diffuserve.deploy.modal_plan import COMPILE_CACHE, HF_HOME, VOLUME_MOUNT, ModalPlan

PLAN = ModalPlan.from_env(os.environ)

IMAGE_STORE_DIR = "/tmp/diffuserve-images"
SOURCE_DIR = "/opt/diffuserve"  # the package source inside the image
SERVER_PORT = 8001  # the model server, loopback only; nginx owns PLAN.port
READY_URL = f"http://127.0.0.1:{SERVER_PORT}/v2/health/ready"  # asked of the server itself, not through nginx
POLL_S = 1.0  # between readiness checks while the front starts
START_SCRIPT = "/usr/local/bin/diffuserve-start"
PYTHON_VERSION = "3.11"  # the version CI tests
# Longer than supervisord's stopwaitsecs for the model server (40 s, itself above its 30 s drain), so
# supervisord finishes its own orderly stop; Modal may end the container sooner.
STOP_WAIT_S = 45

app = modal.App(PLAN.app_name)
hf_cache = modal.Volume.from_name(PLAN.volume, create_if_missing=True)


def find_source_root() -> Path | None:
    """The checkout this diffuserve was installed from (editable install), if there is one."""
    override = os.environ.get("DIFFUSERVE_MODAL_SOURCE")
    if override:
        return Path(override).expanduser().resolve()
    import diffuserve

    root = Path(diffuserve.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "diffuserve").is_dir() else None


def project_dependencies(root: Path, extras: tuple[str, ...] = ("gpu",)) -> list[str]:
    """The package's requirements from pyproject.toml, installed in their own layer so that a code change
    rebuilds only the small layers above it."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deps = list(project.get("dependencies", []))
    for extra in extras:
        deps += project.get("optional-dependencies", {}).get(extra, [])
    return deps


def build_image() -> modal.Image:
    """Debian with nginx and supervisor, this diffuserve, and start.sh, which the `Server` class runs."""
    image = (
        modal.Image.debian_slim(python_version=PYTHON_VERSION)
        .apt_install("nginx", "supervisor")
        .env(
            {
                "HF_HOME": HF_HOME,
                "DIFFUSERVE_CACHE": COMPILE_CACHE,
                # Images of response_format url answers live minutes: the container's own disk, not the
                # Volume every container shares (each server indexes only the images it stored).
                "IMAGE_STORE_DIR": IMAGE_STORE_DIR,
                "DIFFUSERVE_RUN_DIR": "/run/diffuserve",
                "NGINX_USER": "www-data",  # nginx workers drop root
                "PYTHONUNBUFFERED": "1",
            }
        )
    )
    # Every local file is copied into the image (copy=True), so build steps may follow it.
    return (
        install_package(image)
        .add_local_file(DEPLOY_DIR / "start.sh", START_SCRIPT, copy=True)
        .run_commands(f"chmod 0755 {START_SCRIPT}")
    )


def install_package(image: modal.Image) -> modal.Image:
    """This checkout's source over its dependencies, or the released version when not run from a checkout."""
    root = find_source_root()
    if root is None:
        # Installed from a wheel: install the same version (or DIFFUSERVE_MODAL_PIP, e.g. a wheel URL).
        from diffuserve import __version__

        return image.uv_pip_install(
            os.environ.get("DIFFUSERVE_MODAL_PIP") or f"diffuserve[gpu]=={__version__}"
        )
    return (
        image.uv_pip_install(*project_dependencies(root))
        .add_local_file(root / "pyproject.toml", f"{SOURCE_DIR}/pyproject.toml", copy=True)
        .add_local_file(root / "README.md", f"{SOURCE_DIR}/README.md", copy=True)
        .add_local_dir(
            root / "src",
            f"{SOURCE_DIR}/src",
            copy=True,
            ignore=["**/__pycache__", "**/*.pyc", "**/*.egg-info"],
        )
        .run_commands(f"python -m pip install --no-deps {SOURCE_DIR}")
    )


def serve_env() -> dict[str, str]:
    """Plain settings for the container (no secrets): the plan itself, so the remote import rebuilds it,
    the model server's settings and the front's ports."""
    env = {**PLAN.to_env(), **PLAN.server_env()}
    env.update({"FRONT_PORT": str(PLAN.port), "SERVER_PORT": str(SERVER_PORT), "FRONT_HOST": "0.0.0.0"})
    if PLAN.gpu_snapshot:
        # Modal: torch.compile can make GPU snapshot creation fail, and one compile thread avoids some of it.
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    return env


def secrets() -> list[modal.Secret]:
    """HF token and API keys stay in Modal secrets, injected as env vars at start, never baked into the image:
    `modal secret create <name> HF_TOKEN=...` and `modal secret create <name> API_KEYS=...`."""
    return [modal.Secret.from_name(name) for name in (PLAN.hf_secret, PLAN.api_key_secret) if name]


def snapshot_options() -> dict[str, Any]:
    """The GPU half of a memory snapshot is a Modal alpha, switched on per class (--gpu-snapshot)."""
    return {"enable_gpu_snapshot": True} if PLAN.gpu_snapshot else {}


# -- the front's processes, as the `Server` class's hooks drive them --------------------------------------


def start_front() -> subprocess.Popen[bytes]:
    """start.sh renders the configs and becomes supervisord (in the foreground), the parent of everything else."""
    return subprocess.Popen([START_SCRIPT])


def readiness(url: str) -> tuple[int, dict[str, Any]] | None:
    """The server's readiness status and body, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 while loading: the body says how far it got
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
        finally:
            exc.close()
    except (OSError, ValueError):
        return None


def every_size_warm(body: dict[str, Any]) -> bool:
    """Ready, with no worker still loading or warming a batch size (compiled code is specialised per size, and
    a worker may warm its smaller sizes after it first reports ready; until then its entry shows a `phase`),
    and every worker's compile artefacts saved (`compile_cache` present), so the snapshot and the Volume hold
    them rather than a save cut short."""
    workers = body.get("workers") or []
    settled = all("phase" not in w and "compile_cache" in w for w in workers)
    return body.get("status") == "ready" and bool(workers) and settled


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_until_serving(
    front: subprocess.Popen[bytes],
    *,
    every_size: bool,
    timeout: float,
    url: str,
    port: int,
    interval: float = POLL_S,
) -> None:
    """Until the server at `url` is ready (with `every_size`: every batch size warm) and nginx listens on `port`.
    Raises when supervisord exits, the server reports a failure, or `timeout` seconds pass: a clear error at
    once rather than a port that never opens."""
    deadline = time.monotonic() + timeout
    while True:
        if front.poll() is not None:
            raise RuntimeError(f"supervisord exited ({front.returncode}) before the model server was ready")
        answer = readiness(url)
        if answer is not None:
            code, body = answer
            if body.get("status") == "failed":
                raise RuntimeError(f"the model server failed to start: {body.get('error')}")
            if code == 200 and (every_size_warm(body) or not every_size) and port_open(port):
                return
        if time.monotonic() >= deadline:
            state = "warm at every batch size" if every_size else "ready"
            raise TimeoutError(f"the model server was not {state} after {timeout:.0f}s")
        time.sleep(interval)


def stop_front(front: subprocess.Popen[bytes] | None, timeout: float = STOP_WAIT_S) -> None:
    """TERM to supervisord, which stops the model server with TERM (it lets running generations finish) and
    nginx with QUIT; what still runs after `timeout` is killed."""
    if front is None or front.poll() is not None:
        return
    front.terminate()
    try:
        front.wait(timeout)
    except subprocess.TimeoutExpired:
        front.kill()
        front.wait()


image = build_image()


@app.cls(
    image=image,
    gpu=PLAN.gpu,
    volumes={VOLUME_MOUNT: hf_cache},
    secrets=secrets(),
    env=serve_env(),
    min_containers=PLAN.min_containers,
    max_containers=PLAN.max_containers,
    scaledown_window=PLAN.effective_scaledown_window,
    timeout=PLAN.timeout,
    startup_timeout=PLAN.startup_timeout,
    ephemeral_disk=PLAN.ephemeral_disk_mib,
    enable_memory_snapshot=PLAN.gpu_snapshot,
    experimental_options=snapshot_options(),
)
@modal.concurrent(max_inputs=PLAN.concurrency_max, target_inputs=PLAN.concurrency_target)
class Server:
    """The front, its model server and GPU worker(s): processes this container's hooks start and stop."""

    @modal.enter(snap=PLAN.gpu_snapshot)
    def start(self) -> None:
        """Start the front and wait until it serves. With --gpu-snapshot this runs before Modal's snapshot, with
        the GPU, and waits until every batch size is warm, so the snapshot holds the compiled, warmed server."""
        self.front = start_front()
        self.wait(every_size=PLAN.gpu_snapshot)

    @modal.enter(snap=False)
    def check(self) -> None:
        """After a restore the processes resume where the snapshot left them: make sure the server still answers
        ready before Modal sends requests here (without a snapshot `start` has just waited: this returns)."""
        self.wait(every_size=False)

    @modal.exit()
    def stop(self) -> None:
        stop_front(getattr(self, "front", None))

    @modal.web_server(PLAN.port, startup_timeout=PLAN.startup_timeout, label=PLAN.label)
    def serve(self) -> None:
        """Nothing to start: `start` did, and nginx, which holds the port, opened once the model was ready."""

    def wait(self, *, every_size: bool) -> None:
        wait_until_serving(
            self.front,
            every_size=every_size,
            timeout=PLAN.startup_timeout,
            url=READY_URL,
            port=PLAN.port,
            interval=POLL_S,
        )


@app.function(
    image=image,
    volumes={VOLUME_MOUNT: hf_cache},
    secrets=secrets(),
    env={k: v for k, v in serve_env().items() if k != "HF_HUB_OFFLINE"},
    timeout=3 * 3600,
    ephemeral_disk=PLAN.ephemeral_disk_mib,
)
def prefetch() -> str:
    """Download the model's weights into the Volume once and commit them, so serving containers (however many
    start at once) only read the cache and never race to write the same files. A run cut short leaves its
    finished files and partial files on the Volume: running it again resumes."""
    import logging

    from diffuserve.models.registry import is_builtin

    if is_builtin(PLAN.model_repo):
        return f"{PLAN.model_repo} is built in: nothing to download"
    from diffuserve.config import Settings
    from diffuserve.hub import log_progress, pull

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The server's own reading of HF_TOKEN / HUGGINGFACE_ACCESS_TOKEN (from the Modal secret).
    token = Settings.from_env().hf_token
    # Only the files the pipeline loads (the same selection as `diffuserve pull`), checked complete.
    try:
        path = pull(PLAN.model_repo, token=token, progress=log_progress(PLAN.model_repo, interval_s=10))
    finally:
        # Whatever was fetched, parts included, stays on the Volume for the next run to resume.
        os.makedirs(COMPILE_CACHE, exist_ok=True)
        hf_cache.commit()
    return f"{PLAN.model_repo} cached at {path} on volume {PLAN.volume}"
