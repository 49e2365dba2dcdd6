"""The engine's config made from the server's settings, and the model's served name: all a worker is told."""

from __future__ import annotations

import re

from diffuserve.config import Settings
from diffuserve.engine.config import EngineConfig


def model_slug(repo: str) -> str:
    """`black-forest-labs/FLUX.1-dev` → `flux-1-dev`; a local folder → its name."""
    base = repo.rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-") or "model"


def served_model_name(settings: Settings) -> str:
    """The name clients use: explicit, or `<slug>-<tier>-bs<batch>` like `flux-1-dev-s-bs4`."""
    if settings.model_name:
        return settings.model_name
    return f"{model_slug(settings.model_repo)}-{settings.model_size.lower()}-bs{settings.model_batch}"


def engine_config(settings: Settings) -> EngineConfig:
    """Only what the engine and its worker process use: no API keys, no hub token (the hub library reads
    that from the environment, where the worker pool puts it before its first spawn), no HTTP limits."""
    return EngineConfig(
        model_repo=settings.model_repo,
        model_name=served_model_name(settings),
        tier=settings.model_size,
        max_batch=settings.model_batch,
        weights=settings.weights,
        dtype=settings.dtype,
        cache_dir=settings.resolved_cache_dir,
        warmup=settings.warmup,
        cuda_graphs=settings.cuda_graphs,
        parallel_attention=settings.parallel_attention,
        parallel_decode=settings.parallel_decode,
        log_format=settings.log_format.value,
        log_level=settings.log_level.value,
    )
