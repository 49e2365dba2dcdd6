"""First-block step caching (cache-dit / ParaAttention style) on a diffusers FLUX transformer or SDXL UNet.

Each denoising step runs the model's first block, then compares how much that block's output changed since the
last step that was computed in full. Below the threshold the rest of the model is skipped:
- FLUX (`transformer_blocks` + `single_transformer_blocks`): the remaining blocks' residual from the last full
  step is added to this step's first-block output (first-block cache, residual reuse);
- UNet (`down_blocks` …): the whole model output of the last full step is reused (a coarser approximation, since
  a UNet's output is no residual of its first block).
Decisions are made per sample, so an image is the same whatever batch it lands in: a step is skipped only when
every sample in the batch may skip it; otherwise the batch is computed and the samples that could skip get
their cached result. The decision logic runs in eager Python between the compiled blocks (regional
compilation), never inside a compiled graph.

A generation's state (each stream's reference and cache, the counters) must never reach the next generation:
`enable_pipeline_step_cache` makes every call of the pipeline start with an empty cache. A bare model cannot
tell where a generation starts (every FLUX generation starts at t=1.0, so a 1-step call looks like the next
one's second stream): whoever drives one calls `StepCache.reset()` before each generation.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_ATTR = "_diffuserve_step_cache"
# Calls at one timestep are separate streams (true CFG makes 2); more than this is no generation we know of,
# so it starts a new one instead of growing the state.
MAX_STREAMS = 4


@dataclass(frozen=True)
class StepCacheOptions:
    """threshold: relative L1 change of the first block's output (residual for FLUX) below which a step is
    reused; 0 never reuses. warmup_steps: steps always computed at the start of each generation.
    max_consecutive: most reused steps in a row for one sample (bounds the drift)."""

    threshold: float
    warmup_steps: int = 1
    max_consecutive: int = 3

    def validate(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"step cache threshold must be within [0, 1], got {self.threshold}")
        if self.warmup_steps < 1:
            raise ValueError(
                f"step cache warmup_steps must be >= 1 (the first step has nothing to reuse), got {self.warmup_steps}"
            )
        if self.max_consecutive < 1:
            raise ValueError(f"step cache max_consecutive must be >= 1, got {self.max_consecutive}")


@dataclass
class CacheStats:
    """Per-sample step counts of the current generation (they restart with each one, so they stay bounded);
    `per_step` is the fraction of the batch reused at each model call (benchmarks sum it per image)."""

    computed: int = 0
    reused: int = 0
    skipped_steps: int = 0
    per_step: list[float] = field(default_factory=list)


# The shapes, dtypes and devices of a call's tensor inputs: a stream's cache fits only calls that match.
_Signature = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass
class _Stream:
    """What one stream of calls (normally the one call per step) remembers between steps."""

    signature: _Signature = ()
    reference: torch.Tensor | None = None  # first-block signal of the last full step
    cached: tuple[torch.Tensor, ...] | None = (
        None  # residuals (FLUX) or the output (UNet) of the last full step
    )
    consecutive: list[int] = field(default_factory=list)


def _relative_l1(current: torch.Tensor, reference: torch.Tensor) -> list[float]:
    dims = tuple(range(1, current.ndim))
    diff = (current.float() - reference.float()).abs().mean(dim=dims)
    scale = reference.float().abs().mean(dim=dims).clamp_min(1e-12)
    return (diff / scale).tolist()


def _rows(mask: list[bool], like: torch.Tensor) -> torch.Tensor:
    """A (B, 1, …) boolean tensor that broadcasts over a batch-first tensor."""
    return torch.tensor(mask, device=like.device).view(-1, *([1] * (like.ndim - 1)))


class StepCache:
    """Attached to one model; `enable_step_cache` makes it, `disable_step_cache` removes it."""

    stats: CacheStats
    hit: list[bool]  # per sample of the current call: does it reuse the cache?
    first_out: tuple[torch.Tensor, ...]  # the current call's first-block outputs
    _last_timestep: float | None
    _calls_at_timestep: int
    _step: int
    _streams: dict[int, _Stream]
    _stream: _Stream

    def __init__(self, model: nn.Module, options: StepCacheOptions) -> None:
        options.validate()
        self.model = model
        self.options = options
        self.reset()

    # Generation and step bookkeeping -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: the next model call starts a new generation."""
        self.stats = CacheStats()
        self._last_timestep = None
        self._calls_at_timestep = 0
        self._step = 0
        self._streams = {}
        self._stream = _Stream()
        self.hit = []
        self.first_out = ()

    def begin_call(self, timestep: Any, signature: _Signature) -> None:
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if (
            self._last_timestep is None
            or t > self._last_timestep
            or (t == self._last_timestep and self._calls_at_timestep + 1 >= MAX_STREAMS)
        ):
            # Timesteps fall within one generation; a rise means a new one started (for a bare model; a
            # pipeline resets before each call).
            self.reset()
        elif t == self._last_timestep:
            # A second call at the same timestep (true CFG) is its own stream with its own cache.
            self._calls_at_timestep += 1
        else:
            self._step += 1
            self._calls_at_timestep = 0
        self._last_timestep = t
        stream = self._streams.get(self._calls_at_timestep)
        if stream is None or stream.signature != signature:
            # Another size, text length, batch or dtype: nothing cached fits, start the stream afresh.
            stream = self._streams[self._calls_at_timestep] = _Stream(signature=signature)
        batch = signature[0][1][0] if signature and signature[0][1] else 1  # the latent's first dimension
        if len(stream.consecutive) != batch:
            stream.consecutive = [0] * batch
        self._stream = stream
        self.hit = [False] * batch
        self.first_out = ()

    def decide(self, signal: torch.Tensor) -> list[bool]:
        """Per sample: may this step reuse the cache? Updates the consecutive-reuse counters."""
        stream = self._stream
        batch = signal.shape[0]
        if (
            self.options.threshold <= 0
            or stream.reference is None
            or stream.cached is None
            or self._step < self.options.warmup_steps
        ):
            hit = [False] * batch
        else:
            changes = _relative_l1(signal, stream.reference)
            hit = [
                change < self.options.threshold and count < self.options.max_consecutive
                for change, count in zip(changes, stream.consecutive, strict=True)
            ]
        self.hit = hit
        stream.consecutive = [count + 1 if h else 0 for h, count in zip(hit, stream.consecutive, strict=True)]
        # Compare against the last *computed* step, so slow drift still adds up to a recompute.
        if stream.reference is None or not any(hit):
            stream.reference = signal.detach().clone()
        elif not all(hit):
            stream.reference = torch.where(_rows(hit, signal), stream.reference, signal)
        reused = sum(hit)
        self.stats.reused += reused
        self.stats.computed += batch - reused
        self.stats.skipped_steps += int(all(hit))
        self.stats.per_step.append(reused / batch)
        return hit

    def store(self, values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """After a full computation: keep the new cache for computed samples, return the cached values for the
        samples that were allowed to reuse (so each sample's result does not depend on its batch mates)."""
        stream = self._stream
        if stream.cached is None or not any(self.hit):
            stream.cached = tuple(v.detach() for v in values)
            return values
        mask = _rows(self.hit, values[0])
        merged = tuple(torch.where(mask, old, new) for old, new in zip(stream.cached, values, strict=True))
        stream.cached = merged
        return merged

    @property
    def all_hit(self) -> bool:
        return bool(self.hit) and all(self.hit)

    @property
    def cached(self) -> tuple[torch.Tensor, ...]:
        assert self._stream.cached is not None
        return self._stream.cached


# FLUX: first-block residual cache through the block lists -------------------------------------------------------
class _FluxFirstBlock:
    def __init__(self, cache: StepCache, block: nn.Module) -> None:
        self.cache, self.block = cache, block

    def __call__(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        encoder, hidden = self.block(**kwargs)
        self.cache.first_out = (encoder, hidden)
        self.cache.decide(hidden - kwargs["hidden_states"])
        return encoder, hidden


class _FluxBlock:
    def __init__(self, cache: StepCache, block: nn.Module, last: bool) -> None:
        self.cache, self.block, self.last = cache, block, last

    def __call__(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        if cache.all_hit:
            if not self.last:
                return kwargs["encoder_hidden_states"], kwargs["hidden_states"]
            first_encoder, first_hidden = cache.first_out
            res_encoder, res_hidden = cache.cached
            return first_encoder + res_encoder, first_hidden + res_hidden
        encoder, hidden = self.block(**kwargs)
        if not self.last:
            return encoder, hidden
        first_encoder, first_hidden = cache.first_out
        res_encoder, res_hidden = cache.store((encoder - first_encoder, hidden - first_hidden))
        return first_encoder + res_encoder, first_hidden + res_hidden


class _FluxBlockList(nn.ModuleList):
    """Same children (so state-dict keys and compiled blocks are untouched); iteration yields caching proxies."""

    _cache: StepCache
    _first_list: bool
    _last_list: bool

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        blocks = list(self._modules.values())
        if torch.is_grad_enabled():
            yield from blocks
            return
        for i, block in enumerate(blocks):
            if self._first_list and i == 0:
                yield _FluxFirstBlock(self._cache, block)
            else:
                yield _FluxBlock(self._cache, block, last=self._last_list and i == len(blocks) - 1)


# UNet: first down block decides, the whole output is reused -----------------------------------------------------
class _UNetHit(Exception):
    """Raised after the first down block when every sample reuses the cache: nothing else needs computing."""


class _UNetFirstDownBlock:
    def __init__(self, cache: StepCache, block: nn.Module) -> None:
        self.cache, self.block = cache, block

    def __getattr__(self, name: str) -> Any:
        # The UNet asks the block e.g. `has_cross_attention`; answer as the block would.
        return getattr(self.block, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.block(*args, **kwargs)
        self.cache.decide(out[0])
        if self.cache.all_hit:
            raise _UNetHit
        return out


class _UNetDownList(nn.ModuleList):
    _cache: StepCache

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        blocks = list(self._modules.values())
        if torch.is_grad_enabled() or not blocks:
            yield from blocks
            return
        yield _UNetFirstDownBlock(self._cache, blocks[0])
        yield from blocks[1:]


def _timestep_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    return args[1] if len(args) > 1 else 0.0


def _signature_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Signature:
    """The latent input first (its first dimension is the batch), then every other tensor argument."""
    named = [(str(i), a) for i, a in enumerate(args)] + sorted(kwargs.items())
    latent = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    named.sort(key=lambda pair: pair[1] is not latent)
    return tuple(
        (name, tuple(value.shape), value.dtype, value.device)
        for name, value in named
        if isinstance(value, torch.Tensor)
    )


def _flux_forward(cache: StepCache, original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            cache.begin_call(_timestep_of(args, kwargs), _signature_of(args, kwargs))
        return original(*args, **kwargs)

    return forward


def _unet_forward(cache: StepCache, original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return original(*args, **kwargs)
        cache.begin_call(_timestep_of(args, kwargs), _signature_of(args, kwargs))
        return_dict = kwargs.get("return_dict", True)
        try:
            out = original(*args, **kwargs)
        except _UNetHit:
            (sample,) = cache.cached
        else:
            (sample,) = cache.store((out.sample if return_dict else out[0],))
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=sample)
        return (sample,)

    return forward


def supports_step_cache(model: nn.Module) -> bool:
    flux_like = isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList) and isinstance(
        getattr(model, "single_transformer_blocks", None), nn.ModuleList
    )
    unet_like = isinstance(getattr(model, "down_blocks", None), nn.ModuleList) and hasattr(model, "up_blocks")
    return flux_like or unet_like


def enable_step_cache(model: Any, options: StepCacheOptions) -> StepCache:
    """Attach a step cache to a FLUX transformer or a UNet; raises ValueError for other models. The caller
    resets it before each generation (`StepCache.reset`); `enable_pipeline_step_cache` does that itself."""
    disable_step_cache(model)
    cache = StepCache(model, options)
    original = model.forward  # the class's bound forward
    if isinstance(getattr(model, "single_transformer_blocks", None), nn.ModuleList):
        lists = [model.transformer_blocks, model.single_transformer_blocks]
        lists = [blocks for blocks in lists if len(blocks)]
        if sum(len(blocks) for blocks in lists) < 2:
            raise ValueError("a step cache needs at least two transformer blocks")
        for i, blocks in enumerate(lists):
            blocks.__class__ = _FluxBlockList
            blocks._cache = cache
            blocks._first_list = i == 0
            blocks._last_list = i == len(lists) - 1
        model.forward = types.MethodType(_flux_forward(cache, original), model)
    elif isinstance(getattr(model, "down_blocks", None), nn.ModuleList) and len(model.down_blocks):
        model.down_blocks.__class__ = _UNetDownList
        model.down_blocks._cache = cache
        model.forward = types.MethodType(_unet_forward(cache, original), model)
    else:
        raise ValueError(f"no step cache for {type(model).__name__}: needs FLUX-style blocks or a UNet")
    setattr(model, _ATTR, cache)
    return cache


def disable_step_cache(model: Any) -> None:
    cache = getattr(model, _ATTR, None)
    if cache is None:
        return
    for name in ("transformer_blocks", "single_transformer_blocks", "down_blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, (_FluxBlockList, _UNetDownList)):
            blocks.__class__ = nn.ModuleList  # type: ignore[assignment]
            for attr in ("_cache", "_first_list", "_last_list"):
                blocks.__dict__.pop(attr, None)
    model.__dict__.pop("forward", None)
    delattr(model, _ATTR)


def step_cache_of(model: nn.Module) -> StepCache | None:
    return getattr(model, _ATTR, None)


def denoiser_of(pipeline: Any) -> Any:
    """The model that runs every step: a pipeline's transformer or UNet."""
    return getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)


_RESETS = "_diffuserve_resets_step_cache"  # marks the subclasses below
_RESETTING_CLASSES: dict[type, type] = {}


def _resetting_class(cls: type) -> type:
    """A subclass of a pipeline class whose `__call__` empties the denoiser's step cache first (one per class).
    Same name and module, so logs, configs and `type(pipeline).__name__` read as before."""
    if cls in _RESETTING_CLASSES:
        return _RESETTING_CLASSES[cls]
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        cache = step_cache_of(denoiser_of(self))
        if cache is not None:
            cache.reset()
        return original(self, *args, **kwargs)

    namespace = {
        "__call__": __call__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        _RESETS: True,
    }
    subclass = _RESETTING_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return subclass


def enable_pipeline_step_cache(pipeline: Any, options: StepCacheOptions) -> StepCache:
    """Attach a step cache to the pipeline's denoiser and reset it at the start of every pipeline call, so no
    generation sees another's cache (a 1-step call would otherwise leave state the next call reads)."""
    cache = enable_step_cache(denoiser_of(pipeline), options)
    # `pipeline(...)` looks `__call__` up on the type, so an instance attribute would not do: swap the class.
    if not getattr(type(pipeline), _RESETS, False):
        object.__setattr__(pipeline, "__class__", _resetting_class(type(pipeline)))
    return cache
