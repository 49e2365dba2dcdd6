"""The Modal deployment plan: GPU, scaling mode, timeouts and names, validated here before Modal sees them.

`diffuserve deploy modal` builds a plan from flags and hands it to `modal_app.py` as DIFFUSERVE_MODAL_*
environment variables; the app passes the same variables into its containers, so the module builds the
same plan when Modal re-imports it remotely. No Modal import here: the CLI validates without the SDK.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal, get_args

from pydantic import model_validator
from pydantic_settings import SettingsConfigDict

from diffuserve.envsettings import EnvSettings, setting
from diffuserve.types import Tier

ENV_PREFIX = "DIFFUSERVE_MODAL_"
Mode = Literal["single", "fixed", "autoscale"]
MODES: tuple[str, ...] = get_args(Mode)

# GPU names Modal accepts for `gpu=` (https://modal.com/docs/guide/gpu), upper-cased, with the most per container.
GPU_MAX_COUNT = {
    "T4": 8,
    "L4": 8,
    "A10": 4,
    "A10G": 4,
    "L40S": 8,
    "A100": 8,
    "A100-40GB": 8,
    "A100-80GB": 8,
    "RTX-PRO-6000": 8,
    "H100": 8,
    "H100!": 8,
    "H200": 8,
    "B200": 8,
    "B200+": 8,
}

# Modal's limits: scaledown_window 2..3600 s (modal 1.6 rejects anything else in `App.function` and
# `update_autoscaler`), timeouts 1 s..24 h (https://modal.com/docs/guide/timeouts).
SCALEDOWN_MIN, SCALEDOWN_MAX = 2, 3600
TIMEOUT_MIN, TIMEOUT_MAX = 1, 24 * 3600
# Modal's web endpoint proxy answers 303 after 150 s; generation must finish well within it.
MODAL_HTTP_LIMIT_S = 150

# Where the app mounts its Volume, and what lives there. The server's compile cache is DIFFUSERVE_CACHE; the
# engine keeps its artefacts in `<DIFFUSERVE_CACHE>/compile` (diffuserve.engine.tiers.compile.compile_dir).
VOLUME_MOUNT = "/cache"
HF_HOME = f"{VOLUME_MOUNT}/huggingface"  # hub weights: written once by `prefetch`, read by every container
COMPILE_CACHE = f"{VOLUME_MOUNT}/diffuserve"  # compile and tier artefacts: later containers start warm
COMPILE_DIR = f"{COMPILE_CACHE}/compile"
SNAPSHOT_DOCS = "https://modal.com/docs/guide/memory-snapshots"

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class PlanError(ValueError):
    """A deployment setting Modal would reject or that contradicts another; the message names the flag."""


class ModalPlan(EnvSettings):
    """One deployment. Each field's env var is DIFFUSERVE_MODAL_ + its name: `gpu` ↔ DIFFUSERVE_MODAL_GPU."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)
    error_class: ClassVar[type[ValueError]] = PlanError

    app_name: str = setting("diffuserve", help="Modal app name")
    label: str | None = setting(None, help="endpoint label: https://<workspace>--<label>.modal.run")
    gpu: str = setting("H100", help="Modal GPU[:count]")
    mode: Mode = setting("single", help="single GPU, fixed fleet, or autoscale")
    min_containers: int = setting(1, help="containers kept warm", flag="--min")
    max_containers: int = setting(1, help="most containers", flag="--max")
    scaledown_window: int | None = setting(None, help="autoscale: idle seconds before a container stops")
    model_repo: str = setting("black-forest-labs/FLUX.1-schnell", help="hub repo or built-in id")
    model_name: str | None = setting(None, help="name clients send as `model` / X-Model-Name")
    model_batch: int = setting(4, help="most images per batch (sizes concurrency too)")
    model_size: Tier | None = setting(None, help="acceleration tier (default: the server's)")
    max_inputs: int | None = setting(None, help="concurrent requests per container (default 4 × batch)")
    target_inputs: int | None = setting(None, help="concurrency the autoscaler targets (default: batch)")
    timeout: int = setting(3600, help="Modal function timeout, seconds")
    startup_timeout: int = setting(1200, help="seconds a container may take to get ready")
    ephemeral_disk_gib: int | None = setting(None, help="ephemeral disk per container (default: Modal's)")
    volume: str = setting("diffuserve-hf-cache", help="Modal Volume holding the HF and compile caches")
    hf_secret: str | None = setting(None, help="Modal secret holding HF_TOKEN")
    api_key_secret: str | None = setting(None, help="Modal secret holding API_KEYS")
    port: int = setting(8000, help="port nginx listens on inside the container (the front's FRONT_PORT)")
    offline: bool = setting(False, help="serve from the Volume only (HF_HUB_OFFLINE=1)")
    gpu_snapshot: bool = setting(
        False, help="Modal GPU memory snapshot (alpha) of the warmed server; made by `modal deploy` only"
    )

    @model_validator(mode="after")
    def _check(self) -> ModalPlan:
        self._validate_scaling()
        _check_gpu(self.gpu)
        if self.model_batch < 1:
            raise PlanError(f"--model-batch must be >= 1, got {self.model_batch}")
        for flag, value in (("--timeout", self.timeout), ("--startup-timeout", self.startup_timeout)):
            if not TIMEOUT_MIN <= value <= TIMEOUT_MAX:
                raise PlanError(f"{flag} must be {TIMEOUT_MIN}..{TIMEOUT_MAX} s (Modal's range), got {value}")
        if self.ephemeral_disk_gib is not None and self.ephemeral_disk_gib < 1:
            raise PlanError(f"--ephemeral-disk-gib must be >= 1, got {self.ephemeral_disk_gib}")
        if self.max_inputs is not None and self.max_inputs < 1:
            raise PlanError(f"--max-inputs must be >= 1, got {self.max_inputs}")
        if self.target_inputs is not None and self.target_inputs < 1:
            raise PlanError(f"--target-inputs must be >= 1, got {self.target_inputs}")
        if self.concurrency_target > self.concurrency_max:
            raise PlanError(
                f"--target-inputs ({self.concurrency_target}) cannot exceed --max-inputs ({self.concurrency_max})"
            )
        if not 0 < self.port < 65536:
            raise PlanError(f"--port must be 1..65535, got {self.port}")
        for flag, name in (
            ("--app-name", self.app_name),
            ("--volume", self.volume),
            ("--hf-secret", self.hf_secret),
            ("--api-key-secret", self.api_key_secret),
        ):
            if name is not None and not NAME.match(name):
                raise PlanError(f"{flag} must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        if self.label is not None and not LABEL.match(self.label):
            raise PlanError(
                f"--label must be a DNS label (lower-case letters, digits, '-'), got {self.label!r}"
            )
        if not self.model_repo:
            raise PlanError("--model-repo must not be empty")
        if self.gpu_snapshot and self.gpu_count > 1:
            raise PlanError(
                f"--gpu-snapshot needs one GPU per container, got --gpu {self.gpu}: Modal's GPU memory snapshots "
                f"are generally incompatible with multi-GPU code ({SNAPSHOT_DOCS})"
            )
        return self

    def _validate_scaling(self) -> None:
        lo, hi, window = self.min_containers, self.max_containers, self.scaledown_window
        if self.mode == "single":
            if (lo, hi) != (1, 1):
                raise PlanError(f"--mode single runs exactly one container; got --min {lo} --max {hi}")
        elif self.mode == "fixed":
            if lo != hi:
                raise PlanError(
                    f"--mode fixed keeps min = max containers; got --min {lo} --max {hi} (use autoscale)"
                )
            if lo < 1:
                raise PlanError(f"--mode fixed needs at least 1 container, got {lo}")
        else:
            if lo < 0:
                raise PlanError(f"--min must be >= 0, got {lo}")
            if hi < 1:
                raise PlanError(f"--max must be >= 1, got {hi}")
            if lo > hi:
                raise PlanError(f"--min ({lo}) cannot exceed --max ({hi})")
        if window is not None:
            if self.mode != "autoscale":
                raise PlanError("--scaledown-window only applies to --mode autoscale")
            if not SCALEDOWN_MIN <= window <= SCALEDOWN_MAX:
                raise PlanError(
                    f"--scaledown-window must be {SCALEDOWN_MIN}..{SCALEDOWN_MAX} s (Modal's range), got {window}"
                )

    # -- derived values -----------------------------------------------------------------------------------
    @property
    def gpu_count(self) -> int:
        """GPUs per container: the count after ':' in --gpu, 1 without one."""
        _, _, count = self.gpu.partition(":")
        return int(count) if count else 1

    @property
    def concurrency_target(self) -> int:
        """Requests per container the autoscaler aims for: one full batch keeps the GPU busy."""
        return self.target_inputs if self.target_inputs is not None else self.model_batch

    @property
    def concurrency_max(self) -> int:
        """Hard cap per container: room for the batch running plus batches queued behind it (bursts wait
        in the server's queue rather than cold-starting a container for every spike)."""
        return self.max_inputs if self.max_inputs is not None else 4 * self.model_batch

    @property
    def effective_scaledown_window(self) -> int | None:
        return (
            self.scaledown_window
            if self.scaledown_window is not None
            else (300 if self.mode == "autoscale" else None)
        )

    @property
    def ephemeral_disk_mib(self) -> int | None:
        return None if self.ephemeral_disk_gib is None else self.ephemeral_disk_gib * 1024

    def server_env(self) -> dict[str, str]:
        """The model server's own settings inside the container (names from diffuserve.config)."""
        env = {"MODEL_REPO": self.model_repo, "MODEL_BATCH": str(self.model_batch)}
        if self.model_size:
            env["MODEL_SIZE"] = self.model_size.value
        if self.model_name:
            env["MODEL_NAME"] = self.model_name
        if self.offline:
            # After `prefetch`, the weights are on the volume: skip the hub round-trips and never write there.
            env["HF_HUB_OFFLINE"] = "1"
        # The server's deadline stays inside Modal's 150 s HTTP limit so clients get our 504, not a 303.
        env["REQUEST_TIMEOUT"] = str(min(self.timeout, MODAL_HTTP_LIMIT_S - 10))
        return env


def _check_gpu(gpu: str) -> None:
    name, _, count_text = gpu.partition(":")
    key = name.upper()
    if key not in GPU_MAX_COUNT:
        raise PlanError(f"--gpu {gpu!r} is not a Modal GPU type; choose one of {', '.join(GPU_MAX_COUNT)}")
    if count_text and (not count_text.isdigit() or not 1 <= int(count_text) <= GPU_MAX_COUNT[key]):
        raise PlanError(f"--gpu {gpu!r}: the count after ':' must be 1..{GPU_MAX_COUNT[key]} for {key}")
