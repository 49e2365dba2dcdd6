"""First-block step caching as diffusers hooks on a FLUX-style transformer, decided per sample.

Each denoising step runs the model's first block, then compares how much that block's output changed since the
last step that was computed in full. Below the threshold the rest of the blocks are skipped: their residual from
the last full step is added to this step's first-block output (first-block cache, residual reuse).

diffusers' own `FirstBlockCacheConfig` decides once for the whole batch, so an image would depend on its batch
mates; here every sample decides alone: a step is skipped only when every sample may skip it, otherwise the
batch is computed and the samples that could skip get their cached result. The decisions run outside any
compiled graph (`torch.compiler.disable`), between the regionally compiled blocks.

State lives in a stateful `ModelHook` on the denoiser, one stream per diffusers cache context ("cond",
"uncond"); diffusers resets stateful hooks after every pipeline call (`maybe_free_model_hooks`). A stream also
restarts when its timestep does not fall (a new generation on a bare model, or a call that stopped half-way), so
no generation ever reads another's cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from torch import nn

from diffuserve.engine.tiers.recipes import StepCacheOptions

log = logging.getLogger(__name__)

_ROOT_HOOK = "diffuserve_step_cache"
_HEAD_HOOK = "diffuserve_step_cache_head"
_BLOCK_HOOK = "diffuserve_step_cache_block"
# A pipeline that names no cache context: its calls share one stream.
_DEFAULT_CONTEXT = CacheContext("default")


@dataclass
class CacheStats:
    """Per-sample step counts of the last generation (kept after diffusers resets the hook, so a caller can read
    them after the pipeline call); `per_step` is the fraction of the batch reused at each model call."""

    computed: int = 0
    reused: int = 0
    skipped_steps: int = 0
    per_step: list[float] = field(default_factory=list)


# The shapes, dtypes and devices of a call's tensor inputs: a stream's cache fits only calls that match.
_Signature = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]


class _Stream(BaseState):
    """What one stream of calls (one cache context) remembers between steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.signature: _Signature = ()
        self.timestep: float | None = None
        self.step = 0
        self.reference: torch.Tensor | None = None  # first-block signal of the last full step
        self.cached: tuple[torch.Tensor, ...] | None = None  # the blocks' residuals, last full step
        self.consecutive: list[int] = []


class _Streams(StateManager):
    """diffusers' per-context state, with one default stream for pipelines that name no context."""

    @property
    def context(self) -> CacheContext:
        return self._context or _DEFAULT_CONTEXT


def _relative_l1(current: torch.Tensor, reference: torch.Tensor, group: Any = None) -> list[float]:
    """Per sample: mean |current - reference| over mean |reference|. In a context-parallel group each rank
    holds an equal share of the tokens, so the ratio of the sums over every share is the whole image's: every
    rank takes the same decision."""
    dims = tuple(range(1, current.ndim))
    difference = (current.float() - reference.float()).abs().sum(dim=dims)
    sums = torch.stack([difference, reference.float().abs().sum(dim=dims)])
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    return (sums[0] / sums[1].clamp_min(1e-12)).tolist()


def _rows(mask: list[bool], like: torch.Tensor) -> torch.Tensor:
    """A (B, 1, …) boolean tensor that broadcasts over a batch-first tensor."""
    return torch.tensor(mask, device=like.device).view(-1, *([1] * (like.ndim - 1)))


class StepCache:
    """The decisions and cached tensors the hooks of one model share; `step_cache_of(model)` returns it."""

    def __init__(self, options: StepCacheOptions) -> None:
        options.validate()
        self.options = options
        self.streams = _Streams(_Stream)
        self.stats = CacheStats()
        self.hit: list[bool] = []  # per sample of the current call: does it reuse the cache?
        self.first_out: tuple[torch.Tensor, ...] = ()  # the current call's first-block outputs
        # The process group of a context-parallel model, whose ranks must take one decision between them.
        self.group: Any = None
        self._stream = _Stream()
        self._fresh = True  # no call since the last reset: the next one starts a generation

    def reset(self) -> None:
        """Forget every stream; the stats of the last generation stay readable until the next one starts."""
        self.streams.reset()
        self._stream = _Stream()
        self.hit, self.first_out = [], ()
        self._fresh = True

    @torch.compiler.disable
    def begin_call(self, timestep: Any, signature: _Signature) -> None:
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        stream: _Stream = self.streams.get_state()
        if not self._fresh and stream.timestep is not None and t >= stream.timestep:
            # Timesteps fall within one generation; one that does not means a new generation began.
            context = self.streams.context
            self.reset()
            self.streams.set_context(context)
            stream = self.streams.get_state()
        if self._fresh:
            self.stats = CacheStats()
            self._fresh = False
        if stream.timestep is not None:
            stream.step += 1
        if stream.signature != signature:
            # Another size, text length, batch or dtype: nothing cached fits, start the stream afresh.
            stream.reset()
            stream.signature = signature
        stream.timestep = t
        batch = signature[0][1][0] if signature and signature[0][1] else 1  # the latent's first dimension
        if len(stream.consecutive) != batch:
            stream.consecutive = [0] * batch
        self._stream = stream
        self.hit = [False] * batch
        self.first_out = ()

    @torch.compiler.disable
    def decide(self, signal: torch.Tensor) -> bool:
        """Per sample: may this step reuse the cache? Returns whether every sample does."""
        stream = self._stream
        batch = signal.shape[0]
        if (
            self.options.threshold <= 0
            or stream.reference is None
            or stream.cached is None
            or stream.step < self.options.warmup_steps
        ):
            hit = [False] * batch
        else:
            changes = _relative_l1(signal, stream.reference, self.group)
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
        return all(hit)

    @torch.compiler.disable
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

    @torch.compiler.disable
    def all_hit(self) -> bool:
        return bool(self.hit) and all(self.hit)

    @property
    def cached(self) -> tuple[torch.Tensor, ...]:
        assert self._stream.cached is not None
        return self._stream.cached


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


class _RootHook(ModelHook):
    """On the denoiser: opens each call's stream."""

    _is_stateful = True

    def __init__(self, cache: StepCache) -> None:
        super().__init__()
        self.cache = cache
        self.streams = cache.streams  # found by diffusers' `cache_context`, which sets the context on it

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # training: no caching
            self.cache.begin_call(_timestep_of(args, kwargs), _signature_of(args, kwargs))
        return self.fn_ref.original_forward(*args, **kwargs)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.cache.reset()
        return module


class _FluxHeadHook(ModelHook):
    def __init__(self, cache: StepCache) -> None:
        super().__init__()
        self.cache = cache

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        encoder, hidden = self.fn_ref.original_forward(*args, **kwargs)
        if not torch.is_grad_enabled():
            self.cache.first_out = (encoder, hidden)
            self.cache.decide(hidden - kwargs["hidden_states"])
        return encoder, hidden


class _FluxBlockHook(ModelHook):
    """Every later block: skipped when the whole batch reuses; the last one adds or stores the residual."""

    def __init__(self, cache: StepCache, last: bool) -> None:
        super().__init__()
        self.cache, self.last = cache, last

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache
        if torch.is_grad_enabled():
            return self.fn_ref.original_forward(*args, **kwargs)
        if cache.all_hit():
            if not self.last:
                return kwargs["encoder_hidden_states"], kwargs["hidden_states"]
            first_encoder, first_hidden = cache.first_out
            res_encoder, res_hidden = cache.cached
            return first_encoder + res_encoder, first_hidden + res_hidden
        encoder, hidden = self.fn_ref.original_forward(*args, **kwargs)
        if not self.last:
            return encoder, hidden
        first_encoder, first_hidden = cache.first_out
        res_encoder, res_hidden = cache.store((encoder - first_encoder, hidden - first_hidden))
        return first_encoder + res_encoder, first_hidden + res_hidden


def _register(module: nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def enable_step_cache(model: Any, options: StepCacheOptions) -> StepCache:
    """Register the step cache's hooks on a FLUX-style transformer (double and single blocks); raises
    ValueError for other models."""
    blocks = [*getattr(model, "transformer_blocks", ()), *getattr(model, "single_transformer_blocks", ())]
    if not hasattr(model, "single_transformer_blocks") or len(blocks) < 2:
        raise ValueError(f"no step cache for {type(model).__name__}: it needs FLUX-style transformer blocks")
    disable_step_cache(model)
    cache = StepCache(options)
    _register(blocks[0], _FluxHeadHook(cache), _HEAD_HOOK)
    for i, block in enumerate(blocks[1:], start=2):
        _register(block, _FluxBlockHook(cache, last=i == len(blocks)), _BLOCK_HOOK)
    _register(model, _RootHook(cache), _ROOT_HOOK)
    # Registering block hooks stales the registry's cached list of children that `cache_context` walks.
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return cache


def _root_hook(model: Any) -> _RootHook | None:
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(_ROOT_HOOK) if isinstance(registry, HookRegistry) else None
    return hook if isinstance(hook, _RootHook) else None


def disable_step_cache(model: Any) -> None:
    if _root_hook(model) is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in (_ROOT_HOOK, _HEAD_HOOK, _BLOCK_HOOK):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def step_cache_of(model: nn.Module) -> StepCache | None:
    hook = _root_hook(model)
    return hook.cache if hook is not None else None


def denoiser_of(pipeline: Any) -> Any:
    """The model that runs every step: a pipeline's transformer or UNet."""
    return getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
