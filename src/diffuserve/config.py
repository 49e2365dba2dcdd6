"""The server's settings: every environment variable and `diffuserve serve` flag is declared here, once."""

from __future__ import annotations

import argparse
import os
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import field_validator, model_validator
from pydantic_settings import NoDecode

from diffuserve.adapter_settings import AdapterSettings
from diffuserve.choices import LogFormat, LogLevel, LoraBatching
from diffuserve.engine.config import CudaGraphs, DType, Fp8Rounding, ParallelAttention, Weights
from diffuserve.envsettings import setting
from diffuserve.job_settings import JobSettings
from diffuserve.model_specs import ModelSpec, parse_model_devices, parse_models, parse_named_paths
from diffuserve.setting_groups import SETTING_GROUPS
from diffuserve.types import Tier

DEFAULT_MODEL = "digits"
__all__ = [
    "DEFAULT_MODEL",
    "CudaGraphs",
    "DType",
    "LogFormat",
    "LogLevel",
    "LoraBatching",
    "ParallelAttention",
    "Settings",
    "Weights",
]


def split_keys(raw: Any) -> Any:
    """`a,b` → [a, b]; a list (repeated --api-key flags) has each item split the same way."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        return raw
    return [key.strip() for item in items for key in str(item).split(",") if key.strip()]


class Settings(JobSettings, AdapterSettings):
    """Everything the server needs to start. A new setting is one line: `name: type = setting(default, "ENV", help=…)`."""

    models: Annotated[list[str], NoDecode] = setting(
        lambda: [DEFAULT_MODEL],
        "MODELS",
        "MODEL_REPO",
        help="the served models, each [NAME=]REPO: a built-in id (digits, tiny-random), a hub repo id or a "
        "local diffusers folder; comma-separated (the flag may repeat; `diffuserve serve A B` also works)",
        flags=("--model-repo",),
        flag="--model",
        shown_default=DEFAULT_MODEL,
    )
    model_name: str | None = setting(
        None,
        "MODEL_NAME",
        help="name clients use in `model` / X-Model-Name, for a server of one model (several: NAME=REPO)",
        shown_default="derived from repo, tier and batch",
    )
    model_devices: Annotated[list[str], NoDecode] = setting(
        list,
        "MODEL_DEVICES",
        help="a model's own devices, MODEL=DEVICES (flux=0,1); ';'-separated (the flag may repeat); a model "
        "not named here runs on DEVICES, beside the others",
        separator=";",
    )
    model_batch: int = setting(4, "MODEL_BATCH", help="most images one batch may hold", ge=1)
    model_size: Tier = setting(
        Tier.XL,
        "MODEL_SIZE",
        help="acceleration tier (E = exact, no compile; XL = exact, compiled)",
        flags=("--tier",),
    )
    weights: Weights = setting(
        Weights.PRETRAINED,
        "MODEL_WEIGHTS",
        help="pretrained (load the repo's weights) or random (real architecture, random weights)",
    )
    dtype: DType = setting(DType.AUTO, "MODEL_DTYPE", help="model dtype; auto = bf16 on GPU, fp32 on CPU")
    host: str = setting("127.0.0.1", "HOST", help="address the server binds")
    port: int = setting(
        8000,
        "PORT",
        help="port the server binds (behind the nginx front it is SERVER_PORT, passed as this flag)",
        ge=1,
        le=65535,
    )
    devices: str = setting(
        "auto",
        "DEVICES",
        "CUDA_DEVICES",
        help="auto (one worker per visible GPU, else one CPU worker), cpu, or GPU indices like 0,1 or cuda:1",
    )
    cpu_threads: int = setting(
        0,
        "CPU_THREADS",
        help="torch threads per CPU worker; 0 = 1 for built-in models, else the cores shared among CPU workers",
        ge=0,
    )
    parallel: int = setting(
        1,
        "PARALLEL",
        help="GPUs per worker: each worker becomes a group of this many devices running one pipeline with "
        "context parallelism (lower latency per image); DEVICES must divide into such groups",
        ge=1,
    )
    parallel_attention: ParallelAttention = setting(
        ParallelAttention.AUTO,
        "PARALLEL_ATTENTION",
        help="how a group splits attention: auto = ring attention whose K and V are written straight into the "
        "peers' GPU memory (ring-p2p) where the denoiser replays as CUDA graphs in bf16/fp16 and the GPUs can "
        "share memory, else diffusers' Ulysses; diffusers = diffusers' Ulysses always",
    )
    parallel_decode: bool = setting(
        True,
        "PARALLEL_DECODE",
        help="a group's ranks decode the latents together, each a band of the image's rows (DistVAE's patch "
        "parallelism, for VAEs it has an adapter for); off = the leader decodes alone",
    )
    prompt_cache_mb: int = setting(
        256,
        "PROMPT_CACHE_MB",
        help="most MiB of text-encoder outputs each worker keeps on its device, by prompt (FLUX.1): a prompt "
        "seen again skips the text encoders; 0 = off",
        ge=0,
    )
    cuda_graphs: CudaGraphs = setting(
        CudaGraphs.AUTO,
        "CUDA_GRAPHS",
        help="replay the denoiser's calls as captured CUDA graphs: auto = in tiers XL and L on CUDA (the step "
        "cache of M and S decides on the CPU at every step); off = never",
    )
    fp8_rounding: Fp8Rounding = setting(
        Fp8Rounding.NEAREST, "FP8_ROUNDING", help="fp8 weights (L/M/S): nearest or calibrated (GPTQ, cached)"
    )
    max_queue: int = setting(
        256, "MAX_QUEUE", help="most requests waiting for each model; beyond it the server answers 429", ge=1
    )
    batch_wait_ms: float = setting(
        5.0,
        "BATCH_WAIT_MS",
        help="extra wait to fill a batch, only for non-interactive requests that queued while every worker was busy",
        ge=0,
    )
    watchdog_factor: float = setting(
        10.0,
        "WATCHDOG_FACTOR",
        help="a batch running this many times its expected time (from the worker's measured speed) is hung: "
        "its worker is killed and replaced",
        gt=1,
    )
    watchdog_min_seconds: float = setting(
        120.0, "WATCHDOG_MIN_SECONDS", help="no batch counts as hung before this many seconds", gt=0
    )
    request_timeout: float = setting(
        600.0, "REQUEST_TIMEOUT", help="seconds a request may take in all before 504", gt=0
    )
    max_body_bytes: int = setting(1 << 20, "MAX_BODY_BYTES", help="largest request body (413 beyond)", ge=1)
    max_upload_bytes: int = setting(
        64 << 20,
        "MAX_UPLOAD_BYTES",
        help="largest body of an image edit, pictures included (413 beyond)",
        ge=1,
    )
    max_input_pixels: int = setting(
        4096 * 4096,
        "MAX_INPUT_PIXELS",
        help="most pixels of one uploaded picture or mask, checked before decoding it (400 beyond)",
        ge=1,
    )
    header_timeout: float = setting(
        10.0,
        "HEADER_TIMEOUT",
        help="seconds a client has to send its request headers before the connection is closed (408)",
        gt=0,
    )
    body_timeout: float = setting(
        30.0,
        "BODY_TIMEOUT",
        help="seconds a client has to send its request body once the headers are in (408, then closed)",
        gt=0,
    )
    max_connections: int = setting(
        1000,
        "MAX_CONNECTIONS",
        help="open client connections; beyond it a new one gets 503 and is closed",
        ge=1,
    )
    drain_timeout: float = setting(
        30.0,
        "DRAIN_TIMEOUT",
        help="on SIGTERM, seconds to let running generations finish (new ones get 503) before failing the rest",
        ge=0,
    )
    max_images_per_request: int = setting(10, "MAX_IMAGES_PER_REQUEST", help="largest `n`", ge=1)
    max_request_cost: float = setting(
        0.0,
        "MAX_REQUEST_COST",
        help="most megapixel-steps one request may ask for (width × height × steps × n / 10^6; a 1024² FLUX.1-dev "
        "image at 28 steps is 29.4); beyond it 400; 0 = no limit",
        ge=0,
    )
    api_keys: Annotated[list[str], NoDecode] = setting(
        list,
        "API_KEYS",
        "AUTH_TOKEN",
        secret=True,
        help="bearer keys, comma-separated; none = no auth (the flag may repeat)",
        flags=("--api-key",),
        repr=False,
    )
    hf_token: str | None = setting(
        None,
        "HF_TOKEN",
        "HUGGINGFACE_ACCESS_TOKEN",
        help="token for gated hub repos",
        repr=False,
        secret=True,
    )
    hf_home: str | None = setting(
        None,
        "HF_HOME",
        help="hub cache folder (weights); the server passes it on to the hub library",
        shown_default="~/.cache/huggingface",
    )
    cache_dir: str | None = setting(
        None,
        "DIFFUSERVE_CACHE",
        help="compile caches and artefacts",
        shown_default="$HF_HOME/diffuserve or ~/.cache/diffuserve",
    )
    image_store_dir: str | None = setting(
        None,
        "IMAGE_STORE_DIR",
        help="folder keeping the images of response_format url answers (one server per folder)",
        shown_default="$DIFFUSERVE_CACHE/images/port-$PORT",
    )
    image_store_max_bytes: int = setting(
        1 << 30,
        "IMAGE_STORE_MAX_BYTES",
        help="most disk bytes (blocks) of images the store keeps; no image younger than its TTL is deleted, so "
        "a url answer that does not fit is refused with 507 (b64_json still works)",
        ge=1,
    )
    image_url_ttl_seconds: float = setting(
        3600.0,
        "IMAGE_URL_TTL_SECONDS",
        help="seconds an image URL serves its image; then it answers 404 and the file is deleted",
        gt=0,
    )
    public_url: str = setting(
        "",
        "PUBLIC_URL",
        help="the server's public base URL (https://host[:port][/prefix]) for image URLs; set it on an exposed "
        "server; empty = built from each request's X-Forwarded-Proto/-Host/-Prefix headers (believed only from "
        "FORWARDED_ALLOW_IPS), else its Host header",
    )
    warmup: bool = setting(
        True,
        "WARMUP",
        help="warm up the native size: on CPU one full batch before ready; on a GPU batch size 1 before ready, "
        "the others (one step each, two with CUDA graphs) after it between batches, each served once warm",
    )
    playground: bool = setting(
        True, "PLAYGROUND", help="serve the web playground at / and /playground; off for an API-only server"
    )
    send_timeout: float = setting(
        30.0,
        "SEND_TIMEOUT",
        help="seconds a client may accept no byte of a response it is being sent before its connection is "
        "closed (counted in diffuserve_send_timeouts_total)",
        gt=0,
    )
    forwarded_allow_ips: str = setting(
        "127.0.0.1,::1",
        "FORWARDED_ALLOW_IPS",
        help="comma-separated addresses or networks (CIDR) of the proxies whose X-Forwarded-For/-Proto/-Host/"
        "-Prefix headers are trusted (* = any); from other clients they are ignored",
        min_length=1,
    )
    max_body_memory_bytes: int = setting(
        256 << 20,
        "MAX_BODY_MEMORY_BYTES",
        help="most bytes of request bodies held at once across all requests; beyond it 429 with Retry-After "
        "(413 for one body larger than all of it)",
        ge=1,
    )
    loras: Annotated[list[str], NoDecode] = setting(
        list,
        "LORAS",
        help="adapters read at start, NAME=PATH or NAME=org/repo (pulled from the hub), comma-separated (the flag "
        "may repeat)",
        flag="--lora",
    )
    log_format: LogFormat = setting(LogFormat.TEXT, "LOG_FORMAT", help="json: one JSON object per line")
    log_level: LogLevel = setting(LogLevel.INFO, "LOG_LEVEL", help="least severe level logged")

    @field_validator("api_keys", "models", "loras", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return split_keys(value)

    @field_validator("model_devices", mode="before")
    @classmethod
    def _split_placements(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        return [part.strip() for item in items for part in str(item).split(";") if part.strip()]

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        try:
            specs = parse_models(self.models)
        except ValueError as exc:
            raise ValueError(f"MODELS (--model): {exc}") from None
        if self.model_name and len(specs) > 1:
            raise ValueError(
                "MODEL_NAME (--model-name) names the model of a one-model server; with several, write NAME=REPO"
            )
        try:
            parse_model_devices(self.model_devices)
        except ValueError as exc:
            raise ValueError(f"MODEL_DEVICES (--model-devices): {exc}") from None
        self.lora_paths  # noqa: B018 (a malformed NAME=PATH fails here, at start)
        if self.lora_slots and self.lora_slots < self.model_batch + 1:
            raise ValueError(
                f"LORA_SLOTS (--lora-slots) {self.lora_slots} is below MODEL_BATCH + 1 ({self.model_batch + 1}): "
                "a batch of different adapters needs a slot per image and an empty one"
            )
        return self

    @property
    def lora_paths(self) -> dict[str, str]:
        """The adapters read at start, name → path."""
        return parse_named_paths(self.loras, "LORAS (--lora)")

    @property
    def model_specs(self) -> list[ModelSpec]:
        """The served models, in the order given (the first is the one a request without `model` gets)."""
        specs = parse_models(self.models)
        if self.model_name:
            return [ModelSpec(repo=specs[0].repo, name=self.model_name)]
        return specs

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be http(s)://host[:port][/prefix], without query or fragment")
        # Image URLs append /v1/…: a trailing slash would double it.
        return value.rstrip("/")

    @property
    def resolved_cache_dir(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        if self.hf_home:
            return os.path.join(self.hf_home, "diffuserve")
        return os.path.join(os.path.expanduser("~"), ".cache", "diffuserve")

    @property
    def resolved_image_store_dir(self) -> str:
        # One folder per port by default: servers sharing a cache must not count (and evict) each other's images.
        return self.image_store_dir or os.path.join(self.resolved_cache_dir, "images", f"port-{self.port}")

    def export_hub_env(self) -> None:
        """The hub library reads HF_HOME and HF_TOKEN from the environment, in the worker processes too: a
        token given as a flag goes there, the only way it reaches a worker."""
        if self.hf_home:
            os.environ["HF_HOME"] = self.hf_home
        if self.hf_token:
            os.environ["HF_TOKEN"] = self.hf_token


# The env vars of settings that no worker may inherit: the server reads them once, then drops them from its
# own environment before it starts any worker (a worker inherits the environment of the process that spawns it).
# JOBS_DB may be a URL with a password in it.
SERVER_ONLY_SECRETS = (
    *Settings.env_of("api_keys"),
    *Settings.env_of("webhook_secret"),
    *Settings.env_of("jobs_db"),
)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (`--model-repo`, `--port` …); each defaults to None so the env var shows through."""
    Settings.add_arguments(parser, SETTING_GROUPS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags win over env vars, env vars over defaults. Raises ValueError naming the variable and flag."""
    return Settings.from_args(args)
