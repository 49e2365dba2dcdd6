"""The engine's config made from the server's settings, and a model's served name: all a worker is told."""

from __future__ import annotations

from pathlib import Path

from diffuserve.config import Settings
from diffuserve.engine.config import EngineConfig
from diffuserve.loras.catalog import hub_ref
from diffuserve.model_specs import ModelSpec, model_slug

__all__ = ["adapters_enabled", "engine_config", "model_slug", "served_model_name"]


def adapters_enabled(settings: Settings) -> bool:
    """Requests may name adapters where LORA_DIR or an adapter read at start is given."""
    return bool(settings.lora_dir or settings.loras)


def served_model_name(settings: Settings, spec: ModelSpec | None = None) -> str:
    """The name clients use: given (NAME=REPO or MODEL_NAME), or `<slug>-<tier>-bs<batch>` like
    `flux-1-dev-s-bs4`. `spec` defaults to the first served model."""
    spec = spec or settings.model_specs[0]
    if spec.name:
        return spec.name
    return f"{model_slug(spec.repo)}-{settings.model_size.lower()}-bs{settings.model_batch}"


def engine_config(settings: Settings, spec: ModelSpec | None = None) -> EngineConfig:
    """Only what the engine and its worker process use: no API keys, no hub token (the hub library reads
    that from the environment, where the worker pool puts it before its first spawn), no HTTP limits.
    `spec` defaults to the first served model."""
    spec = spec or settings.model_specs[0]
    return EngineConfig(
        model_repo=spec.repo,
        model_name=served_model_name(settings, spec),
        tier=settings.model_size,
        max_batch=settings.model_batch,
        weights=settings.weights,
        dtype=settings.dtype,
        cache_dir=settings.resolved_cache_dir,
        warmup=settings.warmup,
        cuda_graphs=settings.cuda_graphs,
        fp8_rounding=settings.fp8_rounding,
        parallel_attention=settings.parallel_attention,
        parallel_decode=settings.parallel_decode,
        lora_max_rank=settings.lora_max_rank if adapters_enabled(settings) else 0,
        lora_slots=settings.lora_slots,
        lora_cache_bytes=settings.lora_cache_mb * 2**20,
        # Hub adapters are added once pulled (GenerationService's start).
        lora_preload=tuple(
            str(Path(path).expanduser().resolve())
            for path in settings.lora_paths.values()
            if hub_ref(path) is None
        ),
        prompt_cache_bytes=settings.prompt_cache_mb * 2**20,
        log_format=settings.log_format.value,
        log_level=settings.log_level.value,
    )
