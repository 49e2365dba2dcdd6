"""The Modal deployment plan: GPU, scaling mode, timeouts and names, validated here before Modal sees them.

`diffuserve deploy modal` builds a plan from flags and hands it to `modal_app.py` as DIFFUSERVE_MODAL_*
environment variables; the app passes the same variables into its containers, so the module builds the
same plan when Modal re-imports it remotely. No Modal import here: the CLI validates without the SDK.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "DIFFUSERVE_MODAL_"
MODES = ("single", "fixed", "autoscale")

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

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class PlanError(ValueError):
    """A deployment setting Modal would reject or that contradicts another; the message names the flag."""


@dataclass(frozen=True)
class ModalPlan:
    """One deployment. Field names double as env names: `gpu` ↔ DIFFUSERVE_MODAL_GPU."""

    app_name: str = "diffuserve"
    label: str | None = None
    gpu: str = "H100"
    mode: str = "single"
    min_containers: int = 1
    max_containers: int = 1
    scaledown_window: int | None = None
    model_repo: str = "black-forest-labs/FLUX.1-schnell"
    model_name: str | None = None
    model_batch: int = 4
    model_size: str | None = None
    max_inputs: int | None = None
    target_inputs: int | None = None
    timeout: int = 3600
    startup_timeout: int = 1200
    ephemeral_disk_gib: int | None = None
    volume: str = "diffuserve-hf-cache"
    hf_secret: str | None = None
    api_key_secret: str | None = None
    port: int = 8000
    offline: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self._validate_scaling()
        _check_gpu(self.gpu)
        if self.model_batch < 1:
            raise PlanError(f"--model-batch must be >= 1, got {self.model_batch}")
        if self.model_size is not None and self.model_size.upper() not in {"S", "M", "L", "XL"}:
            raise PlanError(f"--model-size must be S, M, L or XL, got {self.model_size!r}")
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
            env["MODEL_SIZE"] = self.model_size.upper()
        if self.model_name:
            env["MODEL_NAME"] = self.model_name
        if self.offline:
            # After `prefetch`, the weights are on the volume: skip the hub round-trips and never write there.
            env["HF_HUB_OFFLINE"] = "1"
        # The server's deadline stays inside Modal's 150 s HTTP limit so clients get our 504, not a 303.
        env["REQUEST_TIMEOUT"] = str(min(self.timeout, MODAL_HTTP_LIMIT_S - 10))
        return env

    # -- env round trip -----------------------------------------------------------------------------------
    def to_env(self) -> dict[str, str]:
        """DIFFUSERVE_MODAL_* variables that rebuild this plan with `from_env` (unset fields are omitted)."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            env[ENV_PREFIX + f.name.upper()] = (
                ("1" if value else "0") if isinstance(value, bool) else str(value)
            )
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ModalPlan:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, str(f.type), raw)
        return cls(**values)


def _check_gpu(gpu: str) -> None:
    name, _, count_text = gpu.partition(":")
    key = name.upper()
    if key not in GPU_MAX_COUNT:
        raise PlanError(f"--gpu {gpu!r} is not a Modal GPU type; choose one of {', '.join(GPU_MAX_COUNT)}")
    if count_text and (not count_text.isdigit() or not 1 <= int(count_text) <= GPU_MAX_COUNT[key]):
        raise PlanError(f"--gpu {gpu!r}: the count after ':' must be 1..{GPU_MAX_COUNT[key]} for {key}")


def _parse(name: str, kind: str, raw: str) -> Any:
    try:
        if "bool" in kind:
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if "int" in kind:
            return int(raw)
    except ValueError:
        raise PlanError(f"{ENV_PREFIX}{name.upper()} must be an integer, got {raw!r}") from None
    return raw
