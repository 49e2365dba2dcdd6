"""Each tier as a named recipe: which techniques it turns on, what it does and what it costs in quality."""

from __future__ import annotations

from dataclasses import dataclass, replace

from diffuserve.engine.tiers.cache import StepCacheOptions
from diffuserve.types import Tier


@dataclass(frozen=True)
class Recipe:
    tier: Tier
    fuse_qkv: bool
    fp8: bool
    compile: bool
    step_cache: StepCacheOptions | None
    does: str
    costs: str

    def validate(self) -> None:
        if self.step_cache is not None:
            self.step_cache.validate()

    def describe(self, dtype: str | None = None) -> str:
        """`dtype`: what the model actually runs in (the recipes keep the pipeline's dtype, bf16 on GPU)."""
        runs_in = f" (model in {dtype})" if dtype else ""
        return f"tier {self.tier.value}{runs_in}: {self.does}; quality cost: {self.costs}"


# No attention-kernel choice in any tier: on the H100 (torch 2.11) PyTorch's default SDPA choice already ran
# FLUX's attention (1×24×4608×128 bf16) in 0.41 ms, forcing cuDNN took 0.43 ms and FlashAttention-2 0.78 ms.
_EXACT = "fused QKV projections, regional torch.compile of the repeated blocks"

# Step-cache thresholds calibrated on the trained digits model (100 prompts, 28 steps, CPU fp32): the first
# block's residual changes 6-10 % per step there; 0.08 reused 11 of 28 steps at 0.7 % relative error, 0.15
# reused 17 at 1.7 %, prompt-following accuracy unchanged (0.94). At 4 steps nothing changes slowly enough to reuse.
RECIPES: dict[Tier, Recipe] = {
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
