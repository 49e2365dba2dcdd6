"""Each tier as a named recipe: which techniques it turns on, what it does and what it costs in quality."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from diffuserve.types import Tier


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


@dataclass(frozen=True)
class Recipe:
    tier: Tier
    fuse_qkv: bool
    fp8: bool
    compile: bool
    step_cache: StepCacheOptions | None
    does: str
    costs: str
    # Passed to torch.compile through diffusers' compile_repeated_blocks; None keeps torch's default mode.
    compile_mode: str | None = None
    compile_options: dict[str, Any] | None = None
    # FLUX's AdaLN modulation computed once per call for all its steps, looked up at each step
    # (diffuserve.engine.modulation): the same products, batched.
    step_modulation: bool = True

    def validate(self) -> None:
        if self.step_cache is not None:
            self.step_cache.validate()
        if self.compile_mode is not None and self.compile_options is not None:
            # torch.compile refuses both at once: a mode is a named set of options.
            raise ValueError("a recipe sets compile_mode or compile_options, not both")

    def describe(self, dtype: str | None = None) -> str:
        """`dtype`: what the model actually runs in (the recipes keep the pipeline's dtype, bf16 on GPU)."""
        runs_in = f" (model in {dtype})" if dtype else ""
        return f"tier {self.tier.value}{runs_in}: {self.does}; quality cost: {self.costs}"


# No attention-kernel choice in any tier: on the H100 (torch 2.11) PyTorch's default SDPA choice already ran
# FLUX's attention (1×24×4608×128 bf16) in 0.41 ms, forcing cuDNN took 0.43 ms and FlashAttention-2 0.78 ms.
_EXACT = (
    "fused QKV projections, regional torch.compile of the repeated blocks, AdaLN modulation once per call"
)

# Step-cache thresholds from benchmarks/calibrate_step_cache.py on the trained digits model (100 prompts, 28
# steps, CPU fp32), raw output in docs/bench/step-cache-calibration.json: 0.08 (M's limits) reuses 11.3 of 28
# steps at 0.7 % relative error vs eager, 0.15 (S) 17.1 at 1.7 %, prompt-following accuracy 94-95 % as eager's
# 94 %. At 4 steps nothing changes slowly enough to reuse.
RECIPES: dict[Tier, Recipe] = {
    Tier.E: Recipe(
        tier=Tier.E,
        fuse_qkv=False,
        fp8=False,
        compile=False,
        step_cache=None,
        step_modulation=False,
        does="the pipeline as diffusers runs it, in its dtype (bf16 on GPU by default); no torch.compile, so "
        "no compile wait at start",
        costs="none (the reference the other tiers are measured against)",
    ),
    Tier.XL: Recipe(
        tier=Tier.XL,
        fuse_qkv=True,
        fp8=False,
        compile=True,
        step_cache=None,
        does=f"the pipeline's dtype (bf16 on GPU by default), {_EXACT}",
        costs="none: the same arithmetic in other kernels, differences are rounding noise of that dtype",
    ),
    Tier.L: Recipe(
        tier=Tier.L,
        fuse_qkv=True,
        fp8=True,
        compile=True,
        step_cache=None,
        does=f"XL + fp8 (e4m3, row-wise dynamic scales) matmuls in the repeated blocks; {_EXACT}",
        costs="fp8 rounding of weights and activations in the block matmuls (near-lossless, see docs/benchmarks.md)",
    ),
    Tier.M: Recipe(
        tier=Tier.M,
        fuse_qkv=True,
        fp8=True,
        compile=True,
        step_cache=StepCacheOptions(threshold=0.08, warmup_steps=2, max_consecutive=2),
        does="L + first-block step cache (reuse a step's residual when the first block changed < 8 %)",
        costs="fp8 rounding, plus reused steps where the image changes slowly",
    ),
    Tier.S: Recipe(
        tier=Tier.S,
        fuse_qkv=True,
        fp8=True,
        compile=True,
        step_cache=StepCacheOptions(threshold=0.15, warmup_steps=1, max_consecutive=3),
        does="L + aggressive first-block step cache (reuse when the first block changed < 15 %)",
        costs="fp8 rounding, plus more reused steps: the largest deviation of the four tiers",
    ),
}


def recipe_for(tier: Tier | str, *, step_cache_threshold: float | None = None) -> Recipe:
    """The tier's recipe; a threshold override (benchmarks, tuning) replaces the step cache's threshold."""
    recipe = RECIPES[Tier.parse(tier)]
    if step_cache_threshold is not None and recipe.step_cache is not None:
        recipe = replace(recipe, step_cache=replace(recipe.step_cache, threshold=step_cache_threshold))
    recipe.validate()
    return recipe
