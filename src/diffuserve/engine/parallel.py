"""Context parallelism for a worker group: join the group's process group and split the denoiser's attention
across its devices with diffusers' own parallel API (ring or Ulysses, `ContextParallelConfig`)."""

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


RINGS = ("ring", "ring-p2p")
P2P = ("ulysses-p2p", "ring-p2p")


def check_attention(loaded: LoadedPipeline, attention: str) -> None:
    """Ring merges each rank's partial attention by its log-sum-exp, which cuDNN attention returns for
    bf16/fp16 on CUDA only."""
    import torch

    ring_runs = loaded.device.startswith("cuda") and loaded.dtype in (torch.bfloat16, torch.float16)
    if attention in RINGS and not ring_runs:
        raise ParallelUnsupported(
            f"PARALLEL_ATTENTION={attention} needs bf16 or fp16 on CUDA (this model runs {loaded.dtype} on "
            f"{loaded.device}); use ulysses"
        )


def resolve_attention(setting: str, *, graphs: bool) -> str:
    """PARALLEL_ATTENTION's `auto`: ring attention with K and V written into the peers' memory (ring-p2p)
    where the denoiser's calls replay as CUDA graphs, the one all-to-all for Q, K and V together where they
    do not. On 2 H200s (FLUX.1-dev, tier L, 1024², with graphs) a step took 57.3-58.7 ms with ring-p2p against
    59.2-61.2 with ulysses-p2p in the same runs and 64.6-66.0 with diffusers' three all-to-alls: ring-p2p's
    transfer runs while the rank attends over its own K and V, where Ulysses has to wait for its exchange
    before and after the attention. Both p2p exchanges are copies and signals whose launches only graphs
    make cheap. Without graphs the CPU sets the pace, and there the stacked exchange's fewer launches made
    it 69 ms a step against diffusers' 84."""
    if setting != "auto":
        return setting
    return "ring-p2p" if graphs else "ulysses"


def parallelize(
    loaded: LoadedPipeline,
    degree: int,
    attention: str = "ulysses",
    *,
    timeout_s: float = 300.0,
    p2p_fallback: str | None = None,
) -> int:
    """Split the denoiser's sequence across `degree` ranks with diffusers' context parallelism; `attention` as
    PARALLEL_ATTENTION says (ulysses, ulysses-p2p, ulysses-diffusers, ring or ring-p2p). Returns the pixels
    per token side, from which the server tells which sizes split evenly. Raises ParallelUnsupported for a
    model that cannot. `timeout_s` bounds a p2p exchange's wait for a peer (NCCL's collectives have the
    group's own); `p2p_fallback` is what a p2p choice becomes where the GPUs cannot share memory (None:
    refuse)."""
    from diffusers import ContextParallelConfig

    from diffuserve.engine.dispatch_override import restore_overrides
    from diffuserve.engine.ring_p2p import install_ring_p2p
    from diffuserve.engine.ulysses import install_fused_qkv
    from diffuserve.engine.ulysses_p2p import install_p2p

    pipeline = loaded.pipeline
    model = denoiser_of(pipeline)
    name = type(model).__name__ if model is not None else type(pipeline).__name__
    if model is None or getattr(model, "_cp_plan", None) is None:
        raise ParallelUnsupported(
            f"PARALLEL={degree}: diffusers has no context-parallel plan for {name}; use PARALLEL=1"
        )
    check_attention(loaded, attention)
    mode = attention
    _check_heads(model, name, mode, degree)
    text_tokens = loaded.family.max_sequence_length
    if text_tokens and text_tokens % degree:
        raise ParallelUnsupported(
            f"PARALLEL={degree}: the {text_tokens} text tokens of {loaded.family.name} do not divide by {degree}"
        )
    p2p_group = None
    if mode in P2P:
        # After the checks above, which refuse a model before any collective; this probe is one.
        p2p_group, why = _p2p_group(loaded)
        if p2p_group is None:
            if p2p_fallback is None:
                raise ParallelUnsupported(f"PARALLEL_ATTENTION={mode}: {why}; use ulysses-diffusers")
            log.warning("%s: %s; the group runs %s instead", mode, why, p2p_fallback)
            mode = p2p_fallback
            # Every rank got the probe's one answer: refusing the fallback here, they all refuse together.
            _check_heads(model, name, mode, degree)
    # diffusers looks its Ulysses and ring classes up at every call: an override holds for this process.
    restore_overrides()
    if mode in RINGS:
        # Its cuDNN backend (the kernel native SDPA picks on an H200 anyway) returns the log-sum-exp that
        # ring needs; diffusers' native SDPA backend does not.
        model.set_attention_backend("_native_cudnn")
        if mode == "ring-p2p":
            install_ring_p2p(p2p_group, timeout_s)
        config = ContextParallelConfig(ring_degree=degree)
    else:
        if mode == "ulysses":
            install_fused_qkv()
        elif mode == "ulysses-p2p":
            install_p2p(p2p_group, timeout_s)
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


def _check_heads(model: Any, name: str, mode: str, degree: int) -> None:
    """Ulysses gives each rank a whole share of the attention heads; ring splits only the tokens."""
    heads = getattr(model.config, "num_attention_heads", None)
    if mode not in RINGS and isinstance(heads, int) and heads % degree:
        raise ParallelUnsupported(
            f"PARALLEL={degree}: {name} has {heads} attention heads, which do not divide by {degree}"
        )


def _p2p_group(loaded: LoadedPipeline) -> tuple[Any, str]:
    """The group for a p2p exchange once every rank has set up symmetric memory with the others, or None and
    why not."""
    import torch.distributed as dist

    from diffuserve.engine.symmetric import p2p_available

    if not loaded.device.startswith("cuda"):
        return None, f"it needs GPUs (this group runs on {loaded.device})"
    group = dist.group.WORLD
    available, why = p2p_available(group, loaded.device)
    if not available:
        return None, f"the group's GPUs cannot write into each other's memory ({why})"
    return group, ""


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
