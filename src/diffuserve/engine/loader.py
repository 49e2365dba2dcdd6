"""Pipeline loading (built-in ids, local diffusers folders, hub repo ids) on the right device and dtype, the known
family it belongs to (defaults live in diffuserve.types), and what the server is told of the loaded model."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffuserve.engine.config import EngineConfig
from diffuserve.models.registry import BUILTIN_MODELS, is_builtin
from diffuserve.types import FLUX_DEV, FLUX_SCHNELL, GENERIC, SDXL, TINY_FLUX, Family, ModelInfo, Task

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is meant for the operator, not a traceback."""


@dataclass
class LoadedPipeline:
    pipeline: Any
    family: Family
    device: str
    dtype: Any


def looks_like_local_path(repo: str) -> bool:
    return repo.startswith(("/", "./", "../", "~")) or (os.path.sep in repo and Path(repo).exists())


def check_model_source(repo: str, weights: str = "pretrained") -> None:
    """Fail fast, before any worker starts, on a model that cannot exist (a missing local folder)."""
    if is_builtin(repo) or weights == "random":
        return
    path = Path(repo).expanduser()
    if looks_like_local_path(repo) and not path.exists():
        raise ModelLoadError(f"model path {repo!r} does not exist")
    if path.exists() and not (path / "model_index.json").exists():
        raise ModelLoadError(f"{repo!r} is not a diffusers pipeline folder (no model_index.json)")


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        # Highest precision CPUs run fast; bf16 is the native precision of the served GPU models.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_pipeline(repo: str, *, device: str, dtype_name: str, weights: str) -> LoadedPipeline:
    """The pipeline on `device` in its dtype. A gated hub repo's token comes from HF_TOKEN in the environment,
    which the hub library reads itself."""
    import torch

    dtype = resolve_dtype(dtype_name, device)
    check_model_source(repo, weights)
    if weights == "random" and not is_builtin(repo):
        from diffuserve.models.random_weights import build_random_pipeline

        pipeline = build_random_pipeline(repo, device=device, dtype=dtype)
    elif is_builtin(repo):
        pipeline = BUILTIN_MODELS[repo]()
    else:
        from diffusers import DiffusionPipeline

        try:
            pipeline = DiffusionPipeline.from_pretrained(os.path.expanduser(repo), torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load model {repo!r}: {exc}") from exc
    if getattr(pipeline, "dtype", dtype) != dtype:
        pipeline.to(dtype=dtype)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    family = _family_of(pipeline, repo)
    torch.set_grad_enabled(False)
    return LoadedPipeline(pipeline=pipeline, family=family, device=device, dtype=dtype)


def _family_of(pipeline: Any, repo: str) -> Family:
    if is_builtin(repo):
        return TINY_FLUX
    transformer = getattr(pipeline, "transformer", None)
    guidance = getattr(getattr(transformer, "config", None), "guidance_embeds", None)
    family = detect_family(type(pipeline).__name__, repo, guidance)
    if family is GENERIC:
        family = _sized_for(pipeline, family)
    return family


def _sized_for(pipeline: Any, family: Family) -> Family:
    """Size step and native size of an unknown pipeline from its own config, so validation matches what it
    accepts (SD3, PixArt or Sana need multiples of 16 or 32, not the generic 8)."""
    denoiser = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
    config = getattr(denoiser, "config", None)
    vae_scale = int(getattr(pipeline, "vae_scale_factor", 8) or 8)
    patch = getattr(config, "patch_size", None)
    step = vae_scale * (patch if isinstance(patch, int) and patch > 0 else 1)
    sample = getattr(config, "sample_size", None)
    native = sample * vae_scale if isinstance(sample, int) else family.native_size
    native = max(step, native // step * step)
    return replace(
        family, size_multiple=max(8, step), native_size=native, min_size=max(family.min_size, step)
    )


def detect_family(pipeline_class: str, repo: str, guidance_embeds: bool | None = None) -> Family:
    """Pick defaults from the pipeline class and repo name; FLUX dev vs schnell by the guidance embedding."""
    lowered = repo.lower()
    if pipeline_class.startswith("Flux"):
        if "schnell" in lowered:
            return FLUX_SCHNELL
        if "dev" in lowered:
            return FLUX_DEV
        return FLUX_DEV if guidance_embeds else FLUX_SCHNELL
    if pipeline_class.startswith("StableDiffusionXL"):
        return SDXL
    return GENERIC


def model_info(
    config: EngineConfig,
    family: Family,
    accepted: set[str] | None = None,
    *,
    parallel: int = 1,
    token_pixels: int = 1,
    edit_tasks: tuple[Task, ...] = (),
) -> ModelInfo:
    """The model's limits and defaults, for the server's validation; `accepted` is what the pipeline's
    `__call__` takes (a negative prompt only where it takes one)."""
    return ModelInfo(
        name=config.model_name,
        family=family.name,
        repo=config.model_repo,
        tier=config.tier,
        default_steps=family.default_steps,
        default_guidance=family.default_guidance,
        native_width=family.native_size,
        native_height=family.native_size,
        size_multiple=family.size_multiple,
        min_size=family.min_size,
        max_size=family.max_size,
        max_steps=family.max_steps,
        supports_negative_prompt=family.supports_negative_prompt
        and (accepted is None or "negative_prompt" in accepted),
        max_batch=config.max_batch,
        parallel=parallel,
        token_pixels=token_pixels,
        edit_tasks=edit_tasks,
    )
