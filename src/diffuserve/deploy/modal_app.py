"""diffuserve on Modal: nginx + the model server in one GPU container, opened only once the model is ready.

Usually driven by `diffuserve deploy modal ...`, whose flags arrive here as DIFFUSERVE_MODAL_* variables
(see diffuserve.deploy.modal_plan). It is also a plain Modal app you can copy and edit:

    diffuserve deploy modal --write-app ./modal_app.py      # a copy to edit
    modal run modal_app.py::prefetch                        # weights into the Volume, once
    modal serve modal_app.py                                # temporary dev endpoint (…-dev.modal.run)
    modal deploy modal_app.py                               # persistent endpoint

How a container starts: the image's entrypoint (start.sh) renders the nginx/supervisord configs and starts
supervisord, which starts the model server; nginx starts only after /v2/health/ready answers 200. Modal
routes traffic to a container once its port accepts connections, so requests never reach a container
whose model is still loading.
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

from diffuserve.deploy import DEPLOY_DIR
from diffuserve.deploy.modal_plan import ModalPlan

PLAN = ModalPlan.from_env(os.environ)

CACHE_DIR = "/cache"  # the Volume's mount point
HF_HOME = f"{CACHE_DIR}/huggingface"  # hub weights: written once by `prefetch`, read by every container
COMPILE_CACHE = f"{CACHE_DIR}/diffuserve"  # compile/tier artefacts: later containers start warm
IMAGE_STORE_DIR = "/tmp/diffuserve-images"
SOURCE_DIR = "/opt/diffuserve"  # the package source inside the image
SERVER_PORT = 8001  # the model server, loopback only; nginx owns PLAN.port
START_SCRIPT = "/usr/local/bin/diffuserve-start"
PYTHON_VERSION = "3.11"  # the version CI tests

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
    root = find_source_root()
    if root is not None:
        image = (
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
    else:
        # Installed from a wheel: install the same version (or DIFFUSERVE_MODAL_PIP, e.g. a wheel URL).
        from diffuserve import __version__

        image = image.uv_pip_install(
            os.environ.get("DIFFUSERVE_MODAL_PIP") or f"diffuserve[gpu]=={__version__}"
        )
    return image


def serve_env() -> dict[str, str]:
    """Plain settings for the container (no secrets): the plan itself, so the remote import rebuilds it,
    the model server's settings and the front's ports."""
    env = {**PLAN.to_env(), **PLAN.server_env()}
    env.update({"FRONT_PORT": str(PLAN.port), "SERVER_PORT": str(SERVER_PORT), "FRONT_HOST": "0.0.0.0"})
    return env


def secrets() -> list[modal.Secret]:
    """HF token and API keys stay in Modal secrets, injected as env vars at start, never baked into the image:
    `modal secret create <name> HF_TOKEN=...` and `modal secret create <name> API_KEYS=...`."""
    return [modal.Secret.from_name(name) for name in (PLAN.hf_secret, PLAN.api_key_secret) if name]


image = build_image()
# Only the serving image gets the entrypoint: `prefetch` runs in the same image without the front.
# Every local file above and here is copied (copy=True) before `.entrypoint`, which Modal requires.
serve_image = (
    image.add_local_file(DEPLOY_DIR / "start.sh", START_SCRIPT, copy=True)
    .run_commands(f"chmod 0755 {START_SCRIPT}")
    .entrypoint([START_SCRIPT])
)


@app.function(
    image=serve_image,
    gpu=PLAN.gpu,
    volumes={CACHE_DIR: hf_cache},
    secrets=secrets(),
    env=serve_env(),
    min_containers=PLAN.min_containers,
    max_containers=PLAN.max_containers,
    scaledown_window=PLAN.effective_scaledown_window,
    timeout=PLAN.timeout,
    startup_timeout=PLAN.startup_timeout,
    ephemeral_disk=PLAN.ephemeral_disk_mib,
)
@modal.concurrent(max_inputs=PLAN.concurrency_max, target_inputs=PLAN.concurrency_target)
@modal.web_server(PLAN.port, startup_timeout=PLAN.startup_timeout, label=PLAN.label)
def serve() -> None:
    """Nothing to start: the entrypoint already runs supervisord, and the port opens when the model is ready."""


@app.function(
    image=image,
    volumes={CACHE_DIR: hf_cache},
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
