"""Whole-denoiser CUDA graphs: each call shape is captured once and then replayed with one launch, so the
CPU no longer sets the pace of a step (installed as a diffusers hook around the denoiser's forward)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_flatten, tree_unflatten

from diffuserve.engine.tiers.recipes import Recipe
from diffuserve.types import Family

log = logging.getLogger(__name__)

HOOK_NAME = "diffuserve_cuda_graphs"
# Graphs kept at once (batch sizes × image sizes), least recently used dropped first. They share one memory
# pool, so more graphs cost little memory; the bound is for a server that sees many odd sizes.
MAX_GRAPHS = 16

_LEAF_TYPES = (bool, int, float, str, type(None))


def graphs_wanted(
    setting: str, *, device: str, recipe: Recipe, family: Family | None = None
) -> tuple[bool, str]:
    """Whether to capture the denoiser (`auto`: wherever it can), and why (or why not) in words for the
    start-up log."""
    if family is not None and not family.cuda_graphs:
        return False, f"CUDA graphs: off for {family.name} (capture of its denoiser is not verified)"
    if setting == "off":
        return False, "CUDA graphs: off (CUDA_GRAPHS=off)"
    if not device.startswith("cuda"):
        return False, f"CUDA graphs: not on {device}"
    if not recipe.compile:
        return False, f"CUDA graphs: not in tier {recipe.tier.value} (it runs the pipeline as diffusers does)"
    if recipe.step_cache is not None:
        # Its skip decision reads a GPU value on the CPU at every step: nothing a graph can hold.
        return False, f"CUDA graphs: not with tier {recipe.tier.value}'s step cache"
    return True, f"CUDA graphs: on (one graph per batch and image size, at most {MAX_GRAPHS})"


def enable_cuda_graphs(model: Any) -> CudaGraphHook:
    """Wrap the denoiser's forward: the first call of a shape runs as usual (it compiles), the second captures
    a graph, later ones replay it. Registered after a group's split, so the split and gather of the sequence
    are inside the graph."""
    hook = CudaGraphHook()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
    return hook


def call_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
    """What a captured graph depends on: each tensor's shape, stride, dtype and device, every other value
    itself, and the call's structure. None when a value cannot be part of a key (the call then runs eagerly)."""
    leaves, spec = tree_flatten((args, kwargs))
    parts: list[Hashable] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        elif isinstance(leaf, _LEAF_TYPES):
            parts.append((type(leaf), leaf))
        else:
            return None
    return tuple(parts)


class CapturedCall:
    """One captured forward: static input tensors to copy each call's inputs into, and its static outputs."""

    def __init__(self, forward: Callable[..., Any], args: tuple, kwargs: dict[str, Any], pool: Any) -> None:
        leaves, spec = tree_flatten((args, kwargs))
        self.inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_args, static_kwargs = tree_unflatten(self.inputs, spec)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's encoder thread may use the GPU (nvJPEG, copies) while a batch of a new
        # shape is captured; only this thread's calls are recorded, and only they must be capture-safe.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            output = forward(*static_args, **static_kwargs)
        self.outputs, self.output_spec = tree_flatten(output)

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        leaves, _ = tree_flatten((args, kwargs))
        for static, given in zip(self.inputs, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(given)
        self.graph.replay()
        # Copies: the next replay overwrites the static outputs, and a caller may hold two results at once
        # (guidance runs the denoiser twice per step).
        fresh = [out.clone() if isinstance(out, torch.Tensor) else out for out in self.outputs]
        return tree_unflatten(fresh, self.output_spec)


class CudaGraphHook(ModelHook):  # type: ignore[misc]
    """diffusers hook replaying captured graphs of the denoiser's forward, per call shape."""

    def __init__(self) -> None:
        super().__init__()
        self.graphs: OrderedDict[Hashable, CapturedCall] = OrderedDict()
        self.seen: set[Hashable] = set()  # call shapes run once (compiled), not captured yet
        self.pool: Any = None
        self.disabled: str | None = None
        self.replays = 0

    def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        # Inside someone else's capture (another graph around this call) the call is simply recorded there.
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if self.disabled or torch.is_grad_enabled() or capturing:
            return forward(*args, **kwargs)
        key = call_key(args, kwargs)
        if key is None:
            return forward(*args, **kwargs)
        captured = self.graphs.get(key)
        if captured is None:
            if key not in self.seen:
                # First call of this shape: compile and lazy set-up happen here, never inside a capture.
                self.seen = set() if len(self.seen) >= 4 * MAX_GRAPHS else self.seen
                self.seen.add(key)
                return forward(*args, **kwargs)
            captured = self._capture(forward, key, args, kwargs)
            if captured is None:
                return forward(*args, **kwargs)
        self.graphs.move_to_end(key)
        self.replays += 1
        return captured(args, kwargs)

    def release(self) -> None:
        """Drop every graph (and its memory); later calls capture again."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _capture(
        self, forward: Callable[..., Any], key: Hashable, args: tuple, kwargs: dict[str, Any]
    ) -> CapturedCall | None:
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        try:
            captured = CapturedCall(forward, args, kwargs, self.pool)
        except Exception as exc:  # a model with a CPU sync in its forward: it keeps running eagerly
            self.disabled = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graphs: capture failed, the denoiser runs without them (%s)", self.disabled)
            return None
        self.seen.discard(key)
        self.graphs[key] = captured
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        log.info("CUDA graphs: captured a denoiser call (%d kept)", len(self.graphs))
        return captured
