"""Each tier as a named recipe: which techniques it turns on, what it does and what it costs in quality."""

from __future__ import annotations

from dataclasses import dataclass

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
    # FLUX's AdaLN modulation once per call for all its steps (tiers.modulation): the same products, batched.
    step_modulation: bool = True

    def describe(self, dtype: str | None = None) -> str:
        """`dtype`: what the model actually runs in (the recipes keep the pipeline's dtype, bf16 on GPU)."""
        runs_in = f" (model in {dtype})" if dtype else ""
        return f"tier {self.tier.value}{runs_in}: {self.does}; quality cost: {self.costs}"


# Why these techniques and thresholds, with the measurements: docs/design/tiers.md.
_EXACT = "fused QKV projections, regional torch.compile of the repeated blocks, FLUX's AdaLN modulation once per call"
_FP8 = "fp8 (e4m3, row-wise dynamic scales) matmuls in the repeated blocks"
RECIPES: dict[Tier, Recipe] = {
    Tier.E: Recipe(
        Tier.E,
        fuse_qkv=False,
        fp8=False,
        compile=False,
        step_cache=None,
        step_modulation=False,
        does="the pipeline as diffusers runs it, in its dtype (bf16 on GPU by default); no compile wait at start",
        costs="none (the reference the other tiers are measured against)",
    ),
    Tier.XL: Recipe(
        Tier.XL,
        fuse_qkv=True,
        fp8=False,
        compile=True,
        step_cache=None,
        does=f"the pipeline's dtype (bf16 on GPU by default), {_EXACT}, the denoiser as CUDA graphs",
        costs="none: the same arithmetic in other kernels, differences are rounding noise of that dtype",
    ),
    Tier.L: Recipe(
        Tier.L,
        fuse_qkv=True,
        fp8=True,
        compile=True,
        step_cache=None,
        does=f"XL + {_FP8}",
        costs="fp8 rounding of weights and activations in the block matmuls (near-lossless)",
    ),
    Tier.M: Recipe(
        Tier.M,
        fuse_qkv=True,
        fp8=True,
        compile=True,
        step_cache=StepCacheOptions(threshold=0.08, warmup_steps=2, max_consecutive=2),
        does=f"{_EXACT}, {_FP8}, first-block step cache (reuse a step's residual when the first block "
        "changed < 8 %); no CUDA graphs (the cache decides on the CPU at every step)",
        costs="fp8 rounding, plus reused steps where the image changes slowly",
    ),
    Tier.S: Recipe(
        Tier.S,
        fuse_qkv=True,
        fp8=True,
        compile=True,
        step_cache=StepCacheOptions(threshold=0.15, warmup_steps=1, max_consecutive=3),
        does="M with an aggressive step cache (reuse when the first block changed < 15 %)",
        costs="fp8 rounding, plus more reused steps: the largest deviation of the four tiers",
    ),
}


def recipe_for(tier: Tier | str) -> Recipe:
    return RECIPES[Tier.parse(tier)]
