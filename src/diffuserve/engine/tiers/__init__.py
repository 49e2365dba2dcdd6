"""Acceleration tiers S/M/L/XL: named recipes applied to a loaded pipeline (fused QKV, fp8, compile, step
cache) as diffusers' hooks and APIs; the engine adds CUDA graphs and the AdaLN tables around a group's split."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from diffuserve.engine.tiers.cache import denoiser_of, enable_step_cache, step_cache_of
from diffuserve.engine.tiers.calibrate import Calibration, calibrate_fp8
from diffuserve.engine.tiers.compile import (
    artifact_key,
    compile_available,
    compile_repeated_blocks,
    configure_compile_cache,
    save_compile_cache,
)
from diffuserve.engine.tiers.kernels import fuse_qkv
from diffuserve.engine.tiers.quantize import fp8_available, quantizable_linears, quantize_fp8
from diffuserve.engine.tiers.recipes import RECIPES, Recipe, StepCacheOptions, Tier, recipe_for
from diffuserve.types import Family

log = logging.getLogger(__name__)

__all__ = [
    "RECIPES",
    "Calibration",
    "Recipe",
    "StepCacheOptions",
    "Tier",
    "apply_recipe",
    "denoiser_of",
    "recipe_for",
    "save_compile_cache",
    "step_cache_of",
]


def apply_recipe(
    pipeline: Any,
    recipe: Recipe,
    *,
    device: str,
    cache_dir: str,
    family: Family | None = None,
    calibration: Calibration | None = None,
) -> list[str]:
    """Apply a recipe in place, only what fits the family (fused QKV where verified, the step cache on FLUX.1
    alone); techniques without a kernel on `device` are skipped and say so, never fail. `calibration`: round
    the fp8 weights by GPTQ on these calls (FP8_ROUNDING=calibrated). Returns human-readable notes of what was
    (and was not) applied, also logged."""
    model = denoiser_of(pipeline)
    if model is None:
        notes = [recipe.describe(), f"{type(pipeline).__name__} has no transformer or UNet: nothing applied"]
    else:
        notes = [recipe.describe(str(model.dtype).removeprefix("torch."))]
        if family is not None:
            recipe = _fitted(recipe, family, notes)
            if family.blocks and not getattr(model, "_repeated_blocks", None):
                # What compile and fp8 work on, where the model class declares no repeated blocks (SD3).
                model._repeated_blocks = list(family.blocks)
        _apply(pipeline, model, recipe, device, cache_dir, notes, family, calibration)
    for note in notes:
        log.info(note)
    return notes


def fp8_skipped(pipeline: Any, device: str) -> str | None:
    """Why an fp8 tier's matmuls do not run for `pipeline` on `device` (the tier's note), or None where they
    run: a transformer (not a UNet), on a device with fp8 kernels and torchao."""
    if getattr(pipeline, "transformer", None) is None:
        # Measured on the H100 (SDXL, 1024², batch 1): the UNet's matmuls are too small for dynamic fp8 to pay
        # (67 ms/step vs 42 bf16 compiled), and its output went non-finite; FLUX's large matmuls gain 25 %.
        return "skipped for UNet models (slower than bf16 at batch 1 on H100, see docs/design/tiers.md)"
    ok, why = fp8_available(device)
    return None if ok else f"skipped, {why}"


def fp8_applies(pipeline: Any, tier: Tier, device: str) -> bool:
    """Whether `tier`'s fp8 matmuls (and so a calibration of their rounding) will run."""
    return recipe_for(tier).fp8 and fp8_skipped(pipeline, device) is None


def _fitted(recipe: Recipe, family: Family, notes: list[str]) -> Recipe:
    if recipe.fuse_qkv and not family.fused_qkv:
        notes.append(f"fused QKV: skipped, not verified for {family.name}")
        recipe = replace(recipe, fuse_qkv=False)
    if recipe.step_cache is not None and not family.flux_hooks:
        notes.append(f"step cache: skipped, FLUX.1's alone (not {family.name})")
        recipe = replace(recipe, step_cache=None)
    return recipe


def _apply(
    pipeline: Any,
    model: Any,
    recipe: Recipe,
    device: str,
    cache_dir: str,
    notes: list[str],
    family: Family | None,
    calibration: Calibration | None,
) -> None:
    if recipe.fuse_qkv:
        fuse_qkv(model, notes)
    # Quantize before compiling, so the compiled graphs see the fp8 weights.
    skipped = fp8_skipped(pipeline, device) if recipe.fp8 else None
    if skipped is not None:
        notes.append(f"fp8: {skipped}")
    elif recipe.fp8:
        layers = quantizable_linears(model, family.fp8_skip if family else ())
        if calibration is not None:
            try:
                calibrate_fp8(
                    layers, calibration.run, cache_dir=cache_dir, context=calibration.context, notes=notes
                )
            except Exception as exc:  # an optional refinement: nearest rounding still serves
                log.warning("fp8 rounding: calibration failed", exc_info=True)
                notes.append(
                    f"fp8 rounding: calibration failed ({type(exc).__name__}: {exc}); the layers it had not "
                    "rounded yet keep the nearest rounding, and nothing was cached"
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        quantize_fp8(model, layers, notes)
    if recipe.compile:
        ok, why = compile_available(device)
        if ok:
            configure_compile_cache(cache_dir, artifact_key(pipeline, recipe.tier.value), notes)
            compile_repeated_blocks(model, notes, varying_text=bool(family and family.varying_text))
        else:
            notes.append(f"torch.compile: skipped, {why}")
    if recipe.step_cache is None:
        return
    try:
        enable_step_cache(model, recipe.step_cache)
    except ValueError as exc:
        notes.append(f"step cache: skipped ({exc})")
        return
    opts = recipe.step_cache
    notes.append(
        f"step cache: threshold {opts.threshold}, first {opts.warmup_steps} step(s) always computed, "
        f"at most {opts.max_consecutive} reused in a row"
    )
