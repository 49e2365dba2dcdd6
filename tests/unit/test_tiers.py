"""Acceleration tiers on CPU: options validate, recipes apply without failing, step caching and random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffuserve.engine.tiers import (
    RECIPES,
    StepCacheOptions,
    Tier,
    apply_tier,
    denoiser_of,
    disable_step_cache,
    enable_step_cache,
    recipe_for,
    save_compile_cache,
    step_cache_of,
)
from diffuserve.engine.tiers.compile import configure_compile_cache
from diffuserve.engine.tiers.quantize import quantize_fp8
from diffuserve.models.tiny_flux import build_tiny_flux


@pytest.fixture(autouse=True)
def _no_grad() -> Any:
    with torch.no_grad():
        yield


def generate(pipe: Any, n: int = 2, steps: int = 8) -> torch.Tensor:
    prompts = ["the digit 3", "a 7", "nine", "zero"][:n]
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompts,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=generators,
        output_type="pt",
        max_sequence_length=32,
    ).images


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# Options -----------------------------------------------------------------------------------------------------------
def test_tier_parse_accepts_any_case_and_names_choices() -> None:
    assert Tier.parse("s") is Tier.S
    assert Tier.parse(" xl ") is Tier.XL
    assert Tier.parse(Tier.M) is Tier.M
    with pytest.raises(ValueError, match="XL, L, M, S"):
        Tier.parse("XXL")


def test_every_recipe_validates_and_says_what_it_costs() -> None:
    for tier, recipe in RECIPES.items():
        recipe.validate()
        assert recipe.tier is tier
        assert "quality cost" in recipe.describe()
    # XL is the exact tier: no quantization, no reuse of steps.
    assert not RECIPES[Tier.XL].fp8 and RECIPES[Tier.XL].step_cache is None
    assert RECIPES[Tier.L].fp8 and RECIPES[Tier.L].step_cache is None
    m_cache, s_cache = RECIPES[Tier.M].step_cache, RECIPES[Tier.S].step_cache
    assert m_cache is not None and s_cache is not None
    assert 0 < m_cache.threshold < s_cache.threshold


def test_threshold_override_and_bad_options_are_rejected() -> None:
    recipe = recipe_for("S", step_cache_threshold=0.2)
    assert recipe.step_cache is not None and recipe.step_cache.threshold == 0.2
    with pytest.raises(ValueError, match="threshold"):
        recipe_for("S", step_cache_threshold=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        StepCacheOptions(threshold=0.1, warmup_steps=0).validate()
    with pytest.raises(ValueError, match="max_consecutive"):
        StepCacheOptions(threshold=0.1, max_consecutive=0).validate()


# Applying tiers on CPU ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", list(Tier))
def test_every_tier_applies_on_cpu_and_says_what_it_skipped(tier: Tier, tmp_path: Path) -> None:
    pipe = build_tiny_flux(seed=0)
    notes = apply_tier(pipe, tier, device="cpu", cache_dir=str(tmp_path))
    text = "\n".join(notes)
    assert "torch.compile: skipped" in text
    assert "fused QKV projections" in text
    if RECIPES[tier].fp8:
        assert "fp8: skipped" in text
    assert (step_cache_of(pipe.transformer) is not None) == (RECIPES[tier].step_cache is not None)
    images = generate(pipe)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_xl_on_cpu_matches_eager() -> None:
    eager = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    apply_tier(pipe, Tier.XL, device="cpu", cache_dir="/nonexistent-unused")
    assert rel_err(generate(pipe), eager) < 1e-5


def test_fp8_is_skipped_without_cuda() -> None:
    notes: list[str] = []
    assert quantize_fp8(build_tiny_flux().transformer, "cpu", notes) is False
    assert "no fp8 matmul kernel on cpu" in notes[0]


# Step cache on FLUX -------------------------------------------------------------------------------------------------
def test_step_cache_at_threshold_zero_changes_nothing() -> None:
    eager = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    cache = enable_step_cache(pipe.transformer, StepCacheOptions(threshold=0.0))
    assert torch.equal(generate(pipe), eager)
    assert cache.stats.reused == 0 and cache.stats.computed == 2 * 8


def test_step_cache_skips_steps_at_a_higher_threshold_and_stays_close() -> None:
    eager = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    cache = enable_step_cache(
        pipe.transformer, StepCacheOptions(threshold=0.5, warmup_steps=1, max_consecutive=2)
    )
    cached = generate(pipe)
    assert cache.stats.skipped_steps > 0
    assert cache.stats.per_step[0] == 0.0  # the warm-up step is always computed
    # No more than two reused steps in a row.
    runs, longest = 0, 0
    for fraction in cache.stats.per_step:
        runs = runs + 1 if fraction == 1.0 else 0
        longest = max(longest, runs)
    assert longest <= 2
    assert not torch.equal(cached, eager)
    assert rel_err(cached, eager) < 0.25


def test_step_cache_resets_between_generations_and_is_batch_invariant() -> None:
    pipe = build_tiny_flux(seed=0)
    cache = enable_step_cache(pipe.transformer, StepCacheOptions(threshold=0.3))
    first = generate(pipe, n=2)
    again = generate(pipe, n=2)
    assert torch.equal(first, again)  # a second generation does not reuse the first one's cache
    alone = generate(pipe, n=1)
    assert rel_err(alone[0], first[0]) < 1e-4
    assert cache.stats.computed > 0


def test_disable_step_cache_restores_the_model() -> None:
    eager = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    keys = set(pipe.transformer.state_dict())
    enable_step_cache(pipe.transformer, StepCacheOptions(threshold=0.5))
    assert set(pipe.transformer.state_dict()) == keys  # same children: weights load and save unchanged
    disable_step_cache(pipe.transformer)
    assert step_cache_of(pipe.transformer) is None
    assert type(pipe.transformer.transformer_blocks) is torch.nn.ModuleList
    assert torch.equal(generate(pipe), eager)


# Step cache on a UNet ------------------------------------------------------------------------------------------------
def tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def denoise(unet: Any, return_dict: bool = True, batch: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 16, 16, generator=gen)
    context = torch.randn(batch, 5, 32, generator=gen)
    outputs = []
    for t in (900, 800, 700, 600, 500, 400):
        out = unet(sample, torch.tensor(t), encoder_hidden_states=context, return_dict=return_dict)
        eps = out.sample if return_dict else out[0]
        sample = sample - 0.05 * eps
        outputs.append(eps)
    return outputs


def test_unet_step_cache_threshold_zero_is_exact_and_high_threshold_reuses() -> None:
    unet = tiny_unet()
    reference = denoise(unet)
    cache = enable_step_cache(unet, StepCacheOptions(threshold=0.0))
    for a, b in zip(denoise(unet), reference, strict=True):
        assert torch.equal(a, b)
    cache = enable_step_cache(unet, StepCacheOptions(threshold=0.9, warmup_steps=1, max_consecutive=5))
    cached = denoise(unet, return_dict=False)
    assert cache.stats.skipped_steps > 0
    # A reused step hands back the last computed prediction.
    reused = [i for i, f in enumerate(cache.stats.per_step) if f == 1.0]
    assert torch.equal(cached[reused[0]], cached[reused[0] - 1])
    disable_step_cache(unet)
    assert all(torch.equal(a, b) for a, b in zip(denoise(unet), reference, strict=True))


# Compile cache (files only; compiling itself is a GPU test) ---------------------------------------------------------
def test_compile_cache_handles_missing_and_corrupt_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    notes: list[str] = []
    configure_compile_cache(str(tmp_path), "key", notes)
    assert "none yet" in notes[-1]
    (tmp_path / "compile" / "key.bin").write_bytes(b"not a cache")
    configure_compile_cache(str(tmp_path), "key", notes)
    assert "not loaded" in notes[-1]  # a corrupt file never stops a start
    # Nothing was compiled in this process: either nothing is written or an empty archive is.
    path = save_compile_cache(str(tmp_path))
    assert path is None or Path(path).exists()


# Random weights ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("repo", "arch", "denoiser_params"),
    [
        ("black-forest-labs/FLUX.1-dev", "flux-dev", 11.90e9),
        ("black-forest-labs/FLUX.1-schnell", "flux-schnell", 11.89e9),
        ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 2.567e9),
    ],
)
def test_random_architectures_match_the_reference_counts(
    repo: str, arch: str, denoiser_params: float
) -> None:
    from diffuserve.engine.random_weights import build_random_pipeline, count_params, param_report

    # The meta device builds 17 B parameters with no memory at all.
    pipe = build_random_pipeline(repo, device="meta", dtype=torch.bfloat16)
    assert all(ok for _, _, ok in param_report(pipe, arch).values())
    assert abs(count_params(denoiser_of(pipe)) - denoiser_params) / denoiser_params < 1e-3
    assert denoiser_of(pipe).dtype == torch.bfloat16
    assert pipe.scheduler.sigmas.dtype == torch.float32  # schedulers are built outside the bf16 context
    clip = pipe.tokenizer(["an astronaut riding a horse"], padding="max_length", max_length=77)
    assert len(clip.input_ids[0]) == 77 and max(clip.input_ids[0]) < 49408
    if arch.startswith("flux"):
        t5 = pipe.tokenizer_2(["a photo"], padding="max_length", max_length=512, truncation=True)
        assert len(t5.input_ids[0]) == 512 and max(t5.input_ids[0]) < 32128


def test_random_weights_refuse_unknown_repos() -> None:
    from diffuserve.engine.random_weights import arch_for_repo

    assert arch_for_repo("black-forest-labs/FLUX.1-schnell").name == "flux-schnell"
    with pytest.raises(ValueError, match=r"FLUX\.1-dev"):
        arch_for_repo("some/other-model")
