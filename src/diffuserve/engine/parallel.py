"""Context parallelism for a worker group: join the group's process group and split the denoiser's attention
across its devices with diffusers' own parallel API (Ulysses, `ContextParallelConfig`)."""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

from diffuserve.engine.loader import LoadedPipeline
from diffuserve.engine.tiers import denoiser_of, step_cache_of
from diffuserve.types import GroupRank

log = logging.getLogger(__name__)


class ParallelUnsupported(RuntimeError):
    """This model cannot run split across the group's devices; the message says why and what to do."""


def init_group(rank: GroupRank, device: str) -> None:
    """Join the group's process group: NCCL between GPUs, gloo between CPU processes. Every collective gives
    up after `rank.timeout_s`, so a hung peer ends in an error (and this rank's exit), never a silent hang."""
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    kwargs: dict[str, Any] = {}
    if cuda:
        import torch

        # Binds the communicator to this rank's GPU at once instead of guessing it from the rank.
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{rank.port}",
        rank=rank.rank,
        world_size=rank.world_size,
        timeout=datetime.timedelta(seconds=rank.timeout_s),
        **kwargs,
    )


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer already gone must not turn a clean exit into a crash
            dist.destroy_process_group()


def check_attention(loaded: LoadedPipeline, attention: str) -> None:
    """Ring merges each rank's partial attention by its log-sum-exp, which diffusers' cuDNN attention returns
    for bf16/fp16 on CUDA only."""
    import torch

    ring_runs = loaded.device.startswith("cuda") and loaded.dtype in (torch.bfloat16, torch.float16)
    if attention == "ring" and not ring_runs:
        raise ParallelUnsupported(
            f"PARALLEL_ATTENTION=ring needs bf16 or fp16 on CUDA (this model runs {loaded.dtype} on "
            f"{loaded.device}); use ulysses"
        )


def resolve_attention(setting: str, *, graphs: bool) -> str:
    """PARALLEL_ATTENTION's `auto`: diffusers' own Ulysses where the denoiser's calls replay as CUDA graphs,
    the one all-to-all for Q, K and V together where they do not. On 2 H200s (FLUX.1-dev, tier L, 1024²)
    diffusers' version took 64.6-66.0 ms a step with graphs against 66.6-67.8 for the stacked one, whose
    stacking and re-layout cost more device time than its saved collectives; without graphs the CPU sets the
    pace, and there three fewer collective launches per block made the stacked one 69 ms against 84."""
    if setting != "auto":
        return setting
    return "ulysses-diffusers" if graphs else "ulysses"


def parallelize(loaded: LoadedPipeline, degree: int, attention: str = "ulysses") -> int:
    """Split the denoiser's sequence across `degree` ranks with diffusers' context parallelism; `attention` as
    PARALLEL_ATTENTION says (ulysses, ulysses-diffusers or ring). Returns the pixels per token side, from which
    the server tells which sizes split evenly. Raises ParallelUnsupported for a model that cannot."""
    from diffusers import ContextParallelConfig

    from diffuserve.engine.ulysses import install_fused_qkv, uninstall_fused_qkv

    pipeline = loaded.pipeline
    model = denoiser_of(pipeline)
    name = type(model).__name__ if model is not None else type(pipeline).__name__
    if model is None or getattr(model, "_cp_plan", None) is None:
        raise ParallelUnsupported(
            f"PARALLEL={degree}: diffusers has no context-parallel plan for {name}; use PARALLEL=1"
        )
    check_attention(loaded, attention)
    mode = attention
    heads = getattr(model.config, "num_attention_heads", None)
    if mode != "ring" and isinstance(heads, int) and heads % degree:
        # Ulysses gives each rank a whole share of the attention heads.
        raise ParallelUnsupported(
            f"PARALLEL={degree}: {name} has {heads} attention heads, which do not divide by {degree}"
        )
    text_tokens = loaded.family.max_sequence_length
    if text_tokens and text_tokens % degree:
        raise ParallelUnsupported(
            f"PARALLEL={degree}: the {text_tokens} text tokens of {loaded.family.name} do not divide by {degree}"
        )
    if mode == "ring":
        # Its cuDNN backend (the kernel native SDPA picks on an H200 anyway) returns the log-sum-exp that
        # ring needs; diffusers' native SDPA backend does not.
        model.set_attention_backend("_native_cudnn")
        config = ContextParallelConfig(ring_degree=degree)
    else:
        # diffusers looks its Ulysses class up at every call: the override holds for this process.
        if mode == "ulysses":
            install_fused_qkv()
        else:
            uninstall_fused_qkv()
        config = ContextParallelConfig(ulysses_degree=degree)
    with _cpu_device_count():
        model.enable_parallelism(config=config)
    cache = step_cache_of(model)
    if cache is not None:
        import torch.distributed as dist

        # Each rank's first-block output is its share of the tokens: the skip decision must be taken on the
        # whole image, or the ranks would part ways (one skipping blocks, one waiting in their collective).
        cache.group = dist.group.WORLD
    pixels = token_pixels(pipeline)
    log.info("context parallel: %s over %d ranks; %d×%d pixels per token", mode, degree, pixels, pixels)
    return pixels


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
