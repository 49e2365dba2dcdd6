"""One settings object for the whole server: every environment variable and CLI flag is declared here."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "digits"


def _env(*names: str) -> str | None:
    """First non-empty value among several environment variable names (aliases keep the names common Modal/TheStage set-ups use)."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _split_keys(raw: str | None) -> list[str]:
    return [key.strip() for key in (raw or "").split(",") if key.strip()]


@dataclass
class Settings:
    """Everything the server needs to start. Each field names its env var(s) in `metadata`."""

    model_repo: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "env": ("MODEL_REPO",),
            "help": "built-in model id (digits, tiny-random), hub repo id or local diffusers folder",
        },
    )
    model_name: str | None = field(
        default=None,
        metadata={
            "env": ("MODEL_NAME",),
            "help": "name clients use in `model` / X-Model-Name (default: derived from repo, tier and batch)",
        },
    )
    model_batch: int = field(
        default=4, metadata={"env": ("MODEL_BATCH",), "help": "most images one batch may hold"}
    )
    model_size: str = field(
        default="XL",
        metadata={"env": ("MODEL_SIZE",), "help": "acceleration tier: S, M, L or XL (XL = exact)"},
    )
    weights: str = field(
        default="pretrained",
        metadata={
            "env": ("MODEL_WEIGHTS",),
            "help": "pretrained (load the repo's weights) or random (real architecture, random weights)",
        },
    )
    host: str = field(default="127.0.0.1", metadata={"env": ("HOST",), "help": "address to bind"})
    port: int = field(default=8000, metadata={"env": ("PORT",), "help": "port to bind"})
    devices: str = field(
        default="auto",
        metadata={
            "env": ("DEVICES", "CUDA_DEVICES"),
            "help": "auto (one worker per visible GPU, else one CPU worker), cpu, or GPU indices like 0,1",
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "env": ("MODEL_DTYPE",),
            "help": "auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32",
        },
    )
    cpu_threads: int = field(
        default=0,
        metadata={
            "env": ("CPU_THREADS",),
            "help": "torch threads per CPU worker; 0 = 1 for built-in models, else the cores shared among CPU workers",
        },
    )
    max_queue: int = field(
        default=256,
        metadata={"env": ("MAX_QUEUE",), "help": "most requests waiting; beyond it the server answers 429"},
    )
    batch_wait_ms: float = field(
        default=5.0,
        metadata={
            "env": ("BATCH_WAIT_MS",),
            "help": "extra wait to fill a batch, only for requests that queued while every worker was busy",
        },
    )
    request_timeout: float = field(
        default=600.0,
        metadata={"env": ("REQUEST_TIMEOUT",), "help": "seconds a request may take in all before 504"},
    )
    max_body_bytes: int = field(
        default=1 << 20, metadata={"env": ("MAX_BODY_BYTES",), "help": "largest request body (413 beyond)"}
    )
    max_images_per_request: int = field(
        default=10, metadata={"env": ("MAX_IMAGES_PER_REQUEST",), "help": "largest `n`"}
    )
    api_keys: list[str] = field(
        default_factory=list,
        metadata={
            "env": ("API_KEYS", "AUTH_TOKEN"),
            "help": "comma-separated bearer tokens; empty = no auth (flag --api-key may repeat)",
        },
    )
    hf_token: str | None = field(
        default=None,
        metadata={"env": ("HF_TOKEN", "HUGGINGFACE_ACCESS_TOKEN"), "help": "token for gated hub repos"},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "env": ("DIFFUSERVE_CACHE",),
            "help": "compile caches and artefacts (default: $HF_HOME/diffuserve or ~/.cache/diffuserve)",
        },
    )
    warmup: bool = field(
        default=True, metadata={"env": ("WARMUP",), "help": "run one generation per worker before ready"}
    )
    playground: bool = field(
        default=True,
        metadata={
            "env": ("PLAYGROUND",),
            "help": "serve the web playground at / and /playground (off: API only)",
        },
    )
    log_format: str = field(default="text", metadata={"env": ("LOG_FORMAT",), "help": "text or json"})
    log_level: str = field(default="info", metadata={"env": ("LOG_LEVEL",), "help": "debug, info, warning"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject impossible settings with a message naming the setting (startup fails, never a worker)."""
        if self.model_batch < 1:
            raise ValueError(f"MODEL_BATCH must be >= 1, got {self.model_batch}")
        if self.model_size.upper() not in {"S", "M", "L", "XL"}:
            raise ValueError(f"MODEL_SIZE must be one of S, M, L, XL, got {self.model_size!r}")
        self.model_size = self.model_size.upper()
        if self.weights not in {"pretrained", "random"}:
            raise ValueError(f"--weights must be pretrained or random, got {self.weights!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"PORT must be 1..65535, got {self.port}")
        if self.cpu_threads < 0:
            raise ValueError(f"CPU_THREADS must be >= 0, got {self.cpu_threads}")
        if self.max_queue < 1:
            raise ValueError(f"MAX_QUEUE must be >= 1, got {self.max_queue}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"BATCH_WAIT_MS must be >= 0, got {self.batch_wait_ms}")
        if self.request_timeout <= 0:
            raise ValueError(f"REQUEST_TIMEOUT must be > 0, got {self.request_timeout}")
        if self.max_body_bytes < 1:
            raise ValueError(f"MAX_BODY_BYTES must be >= 1, got {self.max_body_bytes}")
        if self.max_images_per_request < 1:
            raise ValueError(f"MAX_IMAGES_PER_REQUEST must be >= 1, got {self.max_images_per_request}")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError(f"LOG_LEVEL must be debug, info, warning or error, got {self.log_level!r}")
        if self.log_format not in {"text", "json"}:
            raise ValueError(f"LOG_FORMAT must be text or json, got {self.log_format!r}")
        if self.dtype not in {"auto", "bfloat16", "float16", "float32"}:
            raise ValueError(f"MODEL_DTYPE must be auto, bfloat16, float16 or float32, got {self.dtype!r}")

    @property
    def resolved_cache_dir(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        hf_home = os.environ.get("HF_HOME")
        if hf_home:
            return os.path.join(hf_home, "diffuserve")
        return os.path.join(os.path.expanduser("~"), ".cache", "diffuserve")

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Defaults, then environment variables, then explicit overrides (CLI flags)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = _env(*f.metadata["env"])
            if raw is not None:
                try:
                    values[f.name] = _parse(f.type, raw)
                except ValueError:
                    names = "/".join(f.metadata["env"])
                    raise ValueError(f"{names} must be {f.type}, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind.startswith("list"):
        return _split_keys(raw)
    return raw


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (`--model-repo`, `--port` …); each defaults to None so the env var shows through."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env_names = "/".join(f.metadata["env"])
        default = "none" if f.default in (MISSING, None) else f.default
        help_text = f"{f.metadata['help']} [env {env_names}; default {default}]"
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind.startswith("list"):
            parser.add_argument("--api-key", dest=f.name, action="append", default=None, help=help_text)
        else:
            caster = {"int": int, "float": float}.get(kind, str)
            parser.add_argument(flag, dest=f.name, type=caster, default=None, help=help_text)
    parser.add_argument("--tier", dest="model_size", default=None, help="alias of --model-size")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    flag_keys: list[str] | None = overrides.get("api_keys")
    if flag_keys:
        # `--api-key a,b` means two keys, as API_KEYS=a,b does.
        overrides["api_keys"] = [key for raw in flag_keys for key in _split_keys(raw)]
    return Settings.from_env(**overrides)
