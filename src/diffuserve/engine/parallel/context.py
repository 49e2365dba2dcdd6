"""Context parallelism for a worker group: the denoiser's sequence split across the group's devices with
diffusers' own parallel API, its attention by ring-p2p where that runs and by diffusers' Ulysses elsewhere."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

from diffuserve.engine.config import ParallelAttention
from diffuserve.engine.loader import LoadedPipeline
from diffuserve.engine.tiers import denoiser_of, step_cache_of

log = logging.getLogger(__name__)


class ParallelUnsupported(RuntimeError):
    """This model cannot run split across the group's devices; the message says why and what to do."""


def ring_p2p_runs(loaded: LoadedPipeline, setting: ParallelAttention, *, graphs: bool) -> tuple[bool, str]:
    """Whether ring-p2p may run, as far as this rank can tell alone (the GPUs' peer access is a collective
    probe after it), and why not. It needs CUDA and bf16/fp16 (cuDNN attention gives the log-sum-exp the
    merge needs), and CUDA graphs: its copies and signals are launches that only graphs make cheap."""
    import torch

    if setting is ParallelAttention.DIFFUSERS:
        return False, "PARALLEL_ATTENTION=diffusers"
    if not loaded.family.flux_hooks:
        return False, f"ring-p2p runs on FLUX.1 alone, not {loaded.family.name}"
    if not loaded.device.startswith("cuda") or loaded.dtype not in (torch.bfloat16, torch.float16):
        return False, f"ring-p2p needs bf16 or fp16 on CUDA, not {loaded.dtype} on {loaded.device}"
    if not graphs:
        return False, "ring-p2p runs only where the denoiser replays as CUDA graphs"
    return True, ""


def parallelize(
    loaded: LoadedPipeline,
    degree: int,
    setting: ParallelAttention = ParallelAttention.AUTO,
    *,
    graphs: bool = False,
    timeout_s: float = 300.0,
) -> tuple[int, str]:
    """Split the denoiser's sequence across `degree` ranks (every rank calls this after joining its group).
    Returns the pixels per token side, from which the server tells which sizes split evenly, and the
    attention the group runs. Raises ParallelUnsupported for a model that cannot split, before any
    collective where it can tell alone. `timeout_s` bounds ring-p2p's wait for a peer."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    pipeline = loaded.pipeline
    model = denoiser_of(pipeline)
    name = type(model).__name__ if model is not None else type(pipeline).__name__
    if model is None or getattr(model, "_cp_plan", None) is None:
        raise ParallelUnsupported(
            f"PARALLEL={degree}: diffusers has no context-parallel plan for {name}; use PARALLEL=1"
        )
    text_tokens = loaded.family.max_sequence_length
    if text_tokens and text_tokens % degree:
        raise ParallelUnsupported(
            f"PARALLEL={degree}: the {text_tokens} text tokens of {loaded.family.name} do not divide by {degree}"
        )
    ring, why = ring_p2p_runs(loaded, setting, graphs=graphs)
    heads = getattr(model.config, "num_attention_heads", None)
    if ring:
        from diffuserve.engine.parallel.ring_p2p import p2p_available

        # Every rank gets the probe's one answer, so all of them take the same path from here.
        ring, why = p2p_available(dist.group.WORLD, loaded.device)
    if not ring and isinstance(heads, int) and heads % degree:
        # Ulysses gives each rank a whole share of the attention heads.
        raise ParallelUnsupported(
            f"PARALLEL={degree}: {name} has {heads} attention heads, which do not divide by {degree} ({why})"
        )
    if ring:
        from diffuserve.engine.parallel.ring_p2p import install_ring_p2p

        # diffusers' cuDNN backend returns the log-sum-exp that a ring needs; its native SDPA one does not.
        model.set_attention_backend("_native_cudnn")
        install_ring_p2p(dist.group.WORLD, timeout_s)
        config, attention = ContextParallelConfig(ring_degree=degree), "ring-p2p"
    else:
        config, attention = ContextParallelConfig(ulysses_degree=degree), f"diffusers' Ulysses ({why})"
    with _cpu_device_count():
        model.enable_parallelism(config=config)
    cache = step_cache_of(model)
    if cache is not None:
        # Each rank's first-block output is its share of the tokens: the skip decision must be taken on the
        # whole image, or the ranks would part ways (one skipping blocks, one waiting in their collective).
        cache.group = dist.group.WORLD
    pixels = token_pixels(pipeline)
    log.info("context parallel over %d ranks: %s; %d×%d pixels per token", degree, attention, pixels, pixels)
    return pixels, attention


def token_pixels(pipeline: Any) -> int:
    """Pixels per side of one denoiser token: the VAE's downscale times the patch (FLUX packs 2×2 latents)."""
    vae_scale = int(getattr(pipeline, "vae_scale_factor", 8) or 8)
    if hasattr(pipeline, "_pack_latents"):
        return vae_scale * 2
    patch = getattr(getattr(denoiser_of(pipeline), "config", None), "patch_size", None)
    return vae_scale * (patch if isinstance(patch, int) and patch > 0 else 1)


@contextlib.contextmanager
def _cpu_device_count() -> Iterator[None]:
    """diffusers picks the rank's device as `rank % torch.accelerator.device_count()`, which divides by zero
    where there is no accelerator; the device it picks is only recorded, so one CPU device stands in."""
    import torch

    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        yield
