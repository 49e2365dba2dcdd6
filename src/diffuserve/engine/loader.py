"""Pipeline loading (built-in ids, local diffusers folders, hub repo ids) on the right device and dtype, the known
family it belongs to (defaults live in diffuserve.types), and what the server is told of the loaded model."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffuserve.engine.config import EngineConfig
from diffuserve.engine.prefetch import weight_files
from diffuserve.models.registry import BUILTIN_MODELS, is_builtin
from diffuserve.types import FAMILIES_BY_CLASS, GENERIC, TINY_FLUX, Family, ModelInfo, Task

if TYPE_CHECKING:
    from diffuserve.engine.early_read import EarlyRead, EarlyReadDone

log = logging.getLogger(__name__)

# Pipeline classes that make something other than pictures: refused, not served as generic text-to-image.
NOT_IMAGE = re.compile(r"Video|Audio|Music|Speech|Wan|LTX|Mochi|Allegro|Latte|AnimateDiff|I2V|T2V|Dance")
# The built-in models on the tiny FLUX (the digits sizes); the other built-ins are tiny versions of a family.
TINY_FLUX_MODELS = ("tiny-random", "digits")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is meant for the operator, not a traceback."""


@dataclass
class LoadedPipeline:
    pipeline: Any
    family: Family
    device: str
    dtype: Any
    # What the read started beside the imports brought (engine.early_read), where one ran.
    early_read: EarlyReadDone | None = None


def looks_like_local_path(repo: str) -> bool:
    return repo.startswith(("/", "./", "../", "~")) or (os.path.sep in repo and Path(repo).exists())


def weights_bytes(path: str) -> int:
    """The size of the weight files of a local pipeline folder (a hub model's snapshot in the cache too, whose
    files link to its blobs); 0 where `path` is no folder (a built-in model, a hub id not fetched yet)."""
    return sum(f.stat().st_size for f in weight_files(path))


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


def load_pipeline(
    repo: str, *, device: str, dtype_name: str, weights: str, path: str | None = None
) -> LoadedPipeline:
    """The pipeline on `device` in its dtype, read from `path` where given (a hub model's folder in the cache),
    else from `repo`. A gated hub repo's token comes from HF_TOKEN in the environment, which the hub library
    reads itself."""
    import torch

    from diffuserve.engine.early_read import take_early_read

    dtype = resolve_dtype(dtype_name, device)
    check_model_source(repo, weights)
    early = take_early_read(path or repo, device, dtype) if weights != "random" else None
    try:
        pipeline = _build_or_load(repo, device=device, dtype=dtype, weights=weights, path=path, early=early)
        if getattr(pipeline, "dtype", dtype) != dtype:
            pipeline.to(dtype=dtype)
        pipeline.to(device)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(_out_of_memory(repo, device, dtype, weights)) from exc
    finally:
        done = early.discard() if early is not None else None  # what the load did not take is freed
    pipeline.set_progress_bar_config(disable=True)
    family = _family_of(pipeline, repo)
    torch.set_grad_enabled(False)
    return LoadedPipeline(pipeline=pipeline, family=family, device=device, dtype=dtype, early_read=done)


def _build_or_load(
    repo: str, *, device: str, dtype: Any, weights: str, path: str | None, early: EarlyRead | None = None
) -> Any:
    if weights == "random" and not is_builtin(repo):
        from diffuserve.models.random_weights import build_random_pipeline

        try:
            return build_random_pipeline(repo, device=device, dtype=dtype)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    if is_builtin(repo):
        return BUILTIN_MODELS[repo]()
    import torch
    from diffusers import DiffusionPipeline

    path = path or os.path.expanduser(repo)
    refuse_non_image(_declared_class(path) or "")
    try:
        if device.startswith("cuda"):
            try:
                # Each file's tensors straight onto the worker's GPU (its current device), instead of a copy
                # of every weight in host memory first and a second pass to the device.
                models = _read_directly(repo, path, dtype, early)
                return DiffusionPipeline.from_pretrained(path, dtype=dtype, device_map="cuda", **models)
            except (OSError, torch.OutOfMemoryError):
                raise  # the files or the room are missing: through host memory would fail the same way
            except Exception as exc:  # a pipeline or component that takes no device map (Kandinsky's prior)
                log.warning(
                    "%s: loading through host memory, not straight to the GPU (%s: %s)",
                    repo, type(exc).__name__, exc,
                )  # fmt: skip
                torch.cuda.empty_cache()
        return DiffusionPipeline.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {repo!r}: {exc}") from exc


def _read_directly(repo: str, path: str, dtype: Any, early: EarlyRead | None) -> dict[str, Any]:
    """The folder's diffusers models (the transformer, the VAE) read straight onto the GPU by many threads
    (engine.direct_load), or taken from the read that ran beside the imports; any it cannot fill exactly, or
    all where it fails, are left to from_pretrained."""
    import torch

    from diffuserve.engine.direct_load import load_models

    try:
        return load_models(Path(path), dtype, "cuda", early.take if early is not None else None)
    except (OSError, torch.OutOfMemoryError):
        raise  # the files or the room are missing: from_pretrained would fail the same way
    except Exception as exc:
        log.warning("%s: weights left to from_pretrained (%s: %s)", repo, type(exc).__name__, exc)
        torch.cuda.empty_cache()
        return {}


def import_pipeline_class(repo: str) -> None:
    """Import the pipeline class a local folder declares (diffusers imports it, and the transformers models
    it holds, lazily on first use); nothing for built-in models, hub ids or a class diffusers lacks."""
    if not Path(repo).expanduser().is_dir():
        return
    name = _declared_class(str(Path(repo).expanduser()))
    if name is None:
        return
    import diffusers

    try:
        getattr(diffusers, name)
    except (AttributeError, ImportError):  # not a diffusers class: from_pretrained says so in its own words
        return


def _declared_class(path: str) -> str | None:
    """The `_class_name` of a pipeline's model_index.json (a local folder, or the hub's small file), before
    any weights are fetched; None where it cannot be read (loading then says why)."""
    try:
        if Path(path).is_dir():
            return str(json.loads((Path(path) / "model_index.json").read_text())["_class_name"])
        from diffusers import DiffusionPipeline

        return str(DiffusionPipeline.load_config(path)["_class_name"])
    except Exception:  # unreadable or offline: from_pretrained reports the real problem
        return None


def supported_families() -> str:
    return ", ".join(f"{f.name} ({f.pipeline})" for fs in FAMILIES_BY_CLASS.values() for f in fs)


def refuse_non_image(pipeline_class: str) -> None:
    if NOT_IMAGE.search(pipeline_class):
        raise ModelLoadError(
            f"{pipeline_class} does not make images; diffuserve serves {supported_families()}, and other "
            "diffusers text-to-image pipelines with generic defaults"
        )


def check_tier(family: Family, tier: str) -> None:
    """A tier the family has no technique for is refused at load, never silently served as another."""
    if family.tiers and str(tier) not in family.tiers:
        raise ModelLoadError(
            f"tier {tier} is not available for {family.name} (its tiers: {', '.join(family.tiers)})"
        )


def _out_of_memory(repo: str, device: str, dtype: Any, weights: str) -> str:
    """One line for a load that ran out of device memory: what the model needs, where that is known (random
    weights: the reference counts), and what the device had free once the failed load was released."""
    import gc

    import torch

    gc.collect()
    need = ""
    if weights == "random" and not is_builtin(repo):
        from diffuserve.models.random_weights import EXPECTED_PARAMS, arch_for_repo

        params = sum(EXPECTED_PARAMS[arch_for_repo(repo)].values())
        need = f"needs ≈ {params * torch.tensor([], dtype=dtype).element_size() / 2**30:.1f} GiB, "
    free = ""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        free = f"device has {torch.cuda.mem_get_info(torch.device(device))[0] / 2**30:.1f} GiB free"
    return f"model {repo!r} does not fit on {device}: {need}{free or 'out of memory'}"


def _family_of(pipeline: Any, repo: str) -> Family:
    name = type(pipeline).__name__
    if is_builtin(repo) and repo in TINY_FLUX_MODELS:
        return TINY_FLUX
    refuse_non_image(name)
    config = getattr(
        getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None), "config", None
    )
    family = detect_family(name, repo, dict(config) if config is not None else None)
    if is_builtin(repo):
        return _tiny(family, pipeline)
    if family is GENERIC:
        family = _sized_for(pipeline, family)
    return family


def _tiny(family: Family, pipeline: Any) -> Family:
    """A built-in tiny version of a family: its abilities, small sizes and short prompts."""
    sized = _sized_for(pipeline, family)
    step = sized.size_multiple
    return replace(
        sized,
        name=f"tiny-{family.name}",
        native_size=max(step, 64 // step * step),
        max_size=256,
        max_sequence_length=min(family.max_sequence_length, 32) if family.max_sequence_length else None,
    )


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


def detect_family(pipeline_class: str, repo: str, denoiser_config: dict[str, Any] | None = None) -> Family:
    """The family of a pipeline class (FAMILIES_BY_CLASS); where several share it, a word of the repo id
    (FLUX.1 "schnell"/"dev", SD3.5 "large"/"medium"), else the denoiser's config (FLUX.1's guidance
    embedding, SD3.5's depth) tells them apart. Unknown classes: GENERIC."""
    candidates = FAMILIES_BY_CLASS.get(pipeline_class)
    if not candidates:
        return GENERIC
    words = re.split(r"[^a-z0-9]+", repo.lower())
    for family in candidates:
        if family.repo_hint and family.repo_hint in words:
            return family
    config = denoiser_config or {}
    for family in candidates:
        if family.variant is not None and config.get(family.variant[0]) == family.variant[1]:
            return family
    return candidates[-1]


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
        edit_strength=family.edit in (None, "auto"),
        previews=family.previews is not None,
    )
