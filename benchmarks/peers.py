"""The peers gpu_tiers.py measures beside the tiers: other projects' published FLUX recipes on the same pipeline."""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

# flux-fast's inductor flags (https://github.com/huggingface/flux-fast, utils/pipeline_utils.py, optimize(), at
# commit 5027798; the blog: https://pytorch.org/blog/presenting-flux-fast-making-flux-go-brrr-on-h100s/).
FLUX_FAST_INDUCTOR_FLAGS: dict[str, Any] = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}

# What `python -m cache_dit.generate flux --cache --compile` runs on one GPU (cache_dit 1.5.3,
# cache_dit/_utils/utils.py: its argparse defaults, maybe_apply_optimization, maybe_compile_transformer): the
# command behind the "+ cache" and "+ compile" columns of its H100 table (docs/benchmark/NVIDIA_GPU.md).
# Library defaults (`enable_cache(pipe)` alone) compute 8 front blocks at threshold 0.08: slower.
CACHE_DIT_SETTINGS: dict[str, Any] = {
    "Fn_compute_blocks": 1,
    "Bn_compute_blocks": 0,
    "residual_diff_threshold": 0.12,
    "max_warmup_steps": 8,
    "warmup_interval": 1,
    "max_cached_steps": -1,
    "max_continuous_cached_steps": 3,
}


def _no_undo(pipe: Any) -> None:
    return None


def _no_stats(pipe: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Peer:
    """A recipe from outside the project. `setup(pipe, compile)` applies it in place and returns notes; `undo`
    takes back what reaches beyond the pipeline object; warm-up runs `warmup_calls` calls of `warmup_steps`
    steps (None: the timed calls' steps)."""

    name: str
    module: str
    distribution: str
    recipe: str
    source: str
    settings: dict[str, Any]
    setup: Callable[[Any, bool], list[str]]
    undo: Callable[[Any], None] = _no_undo
    stats: Callable[[Any], dict[str, Any]] = _no_stats
    warmup_calls: int = 2
    warmup_steps: int | None = None


def float8_config() -> Any:
    """torchao's dynamic fp8 config at its defaults (per-tensor scales, as flux-fast calls it): the class that
    torchao 0.17 exposes, else the older function of the same name."""
    import torchao.quantization as quantization

    make = getattr(quantization, "Float8DynamicActivationFloat8WeightConfig", None)
    if make is None:
        make = quantization.float8_dynamic_activation_float8_weight
    return make()


def setup_torchao(pipe: Any, compile: bool = True) -> list[str]:
    """flux-fast's optimize() with diffusers-torchao's channels_last on the transformer too, without flux-fast's FA3
    attention (it needs the flash_attn_interface package, not among the wheels carried to the GPU machine). The
    order is the recipe's: fuse, quantize, layout, inductor flags, compile."""
    from torchao.quantization import quantize_

    notes = []
    pipe.transformer.fuse_qkv_projections()
    if hasattr(pipe.vae, "fuse_qkv_projections"):
        pipe.vae.fuse_qkv_projections()
        notes.append("fused QKV projections in the transformer and the VAE")
    else:
        notes.append("fused QKV projections in the transformer (the VAE has none to fuse)")
    config = float8_config()
    quantize_(pipe.transformer, config)
    notes.append(f"torchao {type(config).__name__}: every linear layer of the transformer")
    pipe.transformer.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        for name, value in FLUX_FAST_INDUCTOR_FLAGS.items():
            setattr(torch._inductor.config, name, value)
        pipe.transformer = torch.compile(pipe.transformer, mode="max-autotune", fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode="max-autotune", fullgraph=True)
        notes.append("torch.compile max-autotune, fullgraph: the transformer and vae.decode")
    return notes


def setup_cache_dit(pipe: Any, compile: bool = True) -> list[str]:
    """DBCache with the settings above, then cache-dit's compile settings and a compile of the repeated blocks
    (its CLI's default, which keeps the cached transformer's Python between the compiled blocks)."""
    import cache_dit

    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**CACHE_DIT_SETTINGS))
    notes = ["DBCache " + ", ".join(f"{k}={v}" for k, v in CACHE_DIT_SETTINGS.items())]
    if compile:
        cache_dit.set_compile_configs()
        torch.set_float32_matmul_precision("high")
        pipe.transformer.compile_repeated_blocks(fullgraph=False, mode=None, dynamic=False)
        notes.append("cache_dit.set_compile_configs(), torch.compile of the repeated blocks (default mode)")
    return notes


def undo_cache_dit(pipe: Any) -> None:
    """enable_cache wraps the pipeline *class's* __call__: every FluxPipeline measured later would run through
    it."""
    import cache_dit

    cache_dit.disable_cache(pipe)


def cache_dit_stats(pipe: Any) -> dict[str, Any]:
    """Steps the last call served from the cache, per cached block group (random weights change a lot from step
    to step, so expect fewer than with released weights)."""
    import cache_dit

    stats = cache_dit.summary(pipe, logging=False)
    return {"cached_steps": [len(s.cached_steps or []) for s in stats if s.cache_options]}


PEERS: dict[str, Peer] = {
    "torchao": Peer(
        name="torchao",
        module="torchao.quantization",
        distribution="torchao",
        recipe="diffusers + torchao fp8 + compile: fuse_qkv_projections (transformer, VAE), quantize_ the transformer "
        "with Float8DynamicActivationFloat8WeightConfig() (per-tensor), channels_last (transformer, VAE), flux-fast's "
        "inductor flags, torch.compile(transformer) and vae.decode in max-autotune with fullgraph; no FA3",
        source="https://github.com/huggingface/flux-fast/blob/5027798d7f69a8e0e478df92f48663c40727f8ea/utils/"
        "pipeline_utils.py (optimize, use_compile); https://github.com/sayakpaul/diffusers-torchao/blob/"
        "9b9f2383dccb8eb73a4c6a8ffe736dd9610c26d2/inference/benchmark_image.py (load_pipeline)",
        settings={
            "inductor": FLUX_FAST_INDUCTOR_FLAGS,
            "compile": {"mode": "max-autotune", "fullgraph": True},
        },
        setup=setup_torchao,
        # flux-fast's use_compile(): three 4-step calls (compile, then CUDA graph recording, then a replay).
        warmup_calls=3,
        warmup_steps=4,
    ),
    "cache-dit": Peer(
        name="cache-dit",
        module="cache_dit",
        distribution="cache-dit",
        recipe="cache_dit.enable_cache(pipe, DBCacheConfig F1B0, threshold 0.12, 8 warm-up steps, at most 3 cached "
        "in a row) + cache_dit.set_compile_configs() + compile_repeated_blocks(): `python -m cache_dit.generate "
        "flux --cache --compile` on one GPU",
        source="https://github.com/vipshop/cache-dit: docs/benchmark/NVIDIA_GPU.md (H100 table), "
        "docs/user_guide/CACHE_API.md, docs/user_guide/COMPILE.md; cache_dit/_utils/utils.py",
        settings={"DBCacheConfig": CACHE_DIT_SETTINGS, "compile": "compile_repeated_blocks(mode=None)"},
        setup=setup_cache_dit,
        undo=undo_cache_dit,
        stats=cache_dit_stats,
        # The cache decides per step: warm-ups run every step, so the cached path has run before timing.
        warmup_calls=2,
        warmup_steps=None,
    ),
}


def is_peer(variant: str) -> bool:
    return variant.partition("/")[0] in PEERS


def peer_for(variant: str) -> Peer:
    """The peer a --tiers entry names; peers take no `/setting` (their recipe is theirs)."""
    name, _, setting = variant.partition("/")
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    if setting:
        raise ValueError(f"peer {name} takes no setting, got {variant!r}")
    return PEERS[name]


def library_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def unavailable(peer: Peer) -> str | None:
    """Why the peer cannot run here (its library does not import), or None."""
    try:
        importlib.import_module(peer.module)
    except Exception as exc:  # an ImportError, or a library that fails while importing
        return f"{peer.distribution} is not importable: {type(exc).__name__}: {exc}"
    return None


def describe(variant: str) -> dict[str, Any]:
    """What a peer's row records besides its timings; {} for a tier (or a name that is no peer)."""
    peer = PEERS.get(variant)
    if peer is None:
        return {}
    return {
        "peer": peer.name,
        "peer_version": library_version(peer.distribution),
        "recipe": peer.recipe,
        "settings": peer.settings,
        "source": peer.source,
    }


@contextmanager
def compile_settings_restored() -> Iterator[None]:
    """Peers set inductor and dynamo flags and the fp32 matmul precision process-wide; the tiers measured after
    them in the same run must not inherit them."""
    configs = [torch._inductor.config, torch._dynamo.config]
    saved = [config.get_config_copy() for config in configs]
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        for config, before in zip(configs, saved, strict=True):
            now = config.get_config_copy()
            config.load_config({key: value for key, value in before.items() if now.get(key) != value})
        torch.set_float32_matmul_precision(precision)


def engine_settings_undone() -> None:
    """The process-wide settings the engine's compiled tiers make (engine/tiers/compile.py: inductor's
    deterministic mode, static shapes) back to torch's defaults, so a peer measured after a tier in the same
    process runs its own recipe and not the engine's."""
    inductor: Any = torch._inductor.config
    if hasattr(inductor, "deterministic"):
        inductor.deterministic = os.environ.get("TORCHINDUCTOR_DETERMINISTIC") == "1"
    dynamo: Any = torch._dynamo.config
    dynamo.automatic_dynamic_shapes = True


@contextmanager
def applied(peer: Peer, pipe: Any, compile: bool = True) -> Iterator[list[str]]:
    """The peer's recipe on `pipe` for the block's length, from torch's default compile settings: its notes
    inside, then its undo and the settings back."""
    with compile_settings_restored():
        engine_settings_undone()
        try:
            yield peer.setup(pipe, compile)
        finally:  # also after a set-up that failed half-way
            peer.undo(pipe)


def psnr_db(image: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR of `image` against `reference` (same shape, values in [0, peak]); inf where they are equal."""
    if image.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(image.shape)} vs {tuple(reference.shape)}")
    mse = float(torch.mean((image.double() - reference.double()) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
