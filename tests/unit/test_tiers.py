"""Acceleration tiers on CPU: options validate, recipes apply without failing, step caching and random weights."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from diffuserve.engine.tiers import (
    RECIPES,
    StepCacheOptions,
    Tier,
    apply_recipe,
    denoiser_of,
    recipe_for,
    save_compile_cache,
    step_cache_of,
)
from diffuserve.engine.tiers import compile as compile_module
from diffuserve.engine.tiers.cache import disable_step_cache, enable_step_cache
from diffuserve.engine.tiers.cache_files import write_atomically
from diffuserve.engine.tiers.compile import configure_compile_cache
from diffuserve.models.tiny_flux import build_tiny_flux
from tests.helpers import dynamo_config_restored


@pytest.fixture(autouse=True)
def _no_grad() -> Any:
    with torch.no_grad():
        yield


def generate(pipe: Any, n: int = 2, steps: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    prompts = ["the digit 3", "a 7", "nine", "zero"][:n]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompts,
        height=size,
        width=size,
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


def test_every_recipe_says_what_it_costs() -> None:
    for tier, recipe in RECIPES.items():
        if recipe.step_cache is not None:
            recipe.step_cache.validate()
        assert recipe.tier is tier
        assert "quality cost" in recipe.describe()
    # XL is the exact tier: no quantization, no reuse of steps.
    assert not RECIPES[Tier.XL].fp8 and RECIPES[Tier.XL].step_cache is None
    assert RECIPES[Tier.L].fp8 and RECIPES[Tier.L].step_cache is None
    m_cache, s_cache = RECIPES[Tier.M].step_cache, RECIPES[Tier.S].step_cache
    assert m_cache is not None and s_cache is not None
    assert 0 < m_cache.threshold < s_cache.threshold


def test_bad_step_cache_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="threshold"):
        StepCacheOptions(threshold=1.5).validate()
    with pytest.raises(ValueError, match="warmup_steps"):
        StepCacheOptions(threshold=0.1, warmup_steps=0).validate()
    with pytest.raises(ValueError, match="max_consecutive"):
        StepCacheOptions(threshold=0.1, max_consecutive=0).validate()


# Applying tiers on CPU ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", list(Tier))
def test_every_tier_applies_on_cpu_and_says_what_it_skipped(tier: Tier, tmp_path: Path) -> None:
    pipe = build_tiny_flux(seed=0)
    notes = apply_recipe(pipe, recipe_for(tier), device="cpu", cache_dir=str(tmp_path))
    text = "\n".join(notes)
    recipe = RECIPES[tier]
    assert ("torch.compile: skipped" in text) == recipe.compile
    assert ("fused QKV projections" in text) == recipe.fuse_qkv
    if RECIPES[tier].fp8:
        assert "fp8: skipped" in text
    assert (step_cache_of(pipe.transformer) is not None) == (RECIPES[tier].step_cache is not None)
    # The model runs fp32 on CPU: the description names that dtype and claims no bf16 for it.
    assert notes[0].startswith(f"tier {tier.value} (model in float32):")
    assert "bf16," not in notes[0]
    images = generate(pipe)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_tier_e_applies_nothing_and_compile_settings_reach_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not any((RECIPES[Tier.E].compile, RECIPES[Tier.E].fp8, RECIPES[Tier.E].fuse_qkv))
    assert RECIPES[Tier.E].step_cache is None
    pipe = build_tiny_flux(seed=0)
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(pipe.transformer, "compile_repeated_blocks", lambda **kw: seen.append(kw))
    notes: list[str] = []
    assert compile_module.compile_repeated_blocks(pipe.transformer, notes)
    # Static shapes: each served batch size gets its own kernels at warm-up.
    assert seen == [{"dynamic": False}]
    assert "2 blocks" in notes[0]


def test_xl_on_cpu_matches_eager() -> None:
    eager = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    apply_recipe(pipe, recipe_for(Tier.XL), device="cpu", cache_dir="/nonexistent-unused")
    assert rel_err(generate(pipe), eager) < 1e-5


def test_fp8_is_skipped_without_cuda() -> None:
    notes = apply_recipe(build_tiny_flux(), recipe_for(Tier.L), device="cpu", cache_dir="/nonexistent-unused")
    assert "fp8: skipped, no fp8 matmul kernel on cpu" in notes


# Step cache on FLUX -------------------------------------------------------------------------------------------------
def test_step_cache_at_threshold_zero_changes_nothing() -> None:
    eager = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    cache = enable_step_cache(denoiser_of(pipe), StepCacheOptions(threshold=0.0))
    assert torch.equal(generate(pipe), eager)
    assert cache.stats.reused == 0 and cache.stats.computed == 2 * 8


def test_step_cache_skips_steps_at_a_higher_threshold_and_stays_close() -> None:
    eager = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    cache = enable_step_cache(
        denoiser_of(pipe), StepCacheOptions(threshold=0.5, warmup_steps=1, max_consecutive=2)
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
    cache = enable_step_cache(denoiser_of(pipe), StepCacheOptions(threshold=0.3))
    first = generate(pipe, n=2)
    again = generate(pipe, n=2)
    assert torch.equal(first, again)  # a second generation does not reuse the first one's cache
    alone = generate(pipe, n=1)
    assert rel_err(alone[0], first[0]) < 1e-4
    assert cache.stats.computed > 0


def test_a_short_call_leaves_nothing_for_the_next_one() -> None:
    # Every FLUX call starts at t=1.0: after a 1-step call, the next call must not read that call's cache.
    # The threshold is high enough that this random tiny model reuses steps (at S's 0.15 it reuses none).
    s = recipe_for("S")
    tier_s = replace(s, step_cache=replace(s.step_cache, threshold=0.5))
    fresh = build_tiny_flux(seed=0)
    apply_recipe(fresh, tier_s, device="cpu", cache_dir="/nonexistent-unused")
    expected = generate(fresh, steps=8)
    pipe = build_tiny_flux(seed=0)
    apply_recipe(pipe, tier_s, device="cpu", cache_dir="/nonexistent-unused")
    cache = step_cache_of(pipe.transformer)
    generate(pipe, steps=1, seed=100)  # an unrelated request of the same shape
    assert torch.equal(generate(pipe, steps=8), expected)
    assert cache is not None and cache.stats.reused > 0


def test_sizes_change_back_to_back_and_state_stays_bounded() -> None:
    pipe = build_tiny_flux(seed=0)
    cache = enable_step_cache(denoiser_of(pipe), StepCacheOptions(threshold=0.5))
    for _ in range(5):
        generate(pipe, n=1, steps=1)
    assert len(cache.stats.per_step) == 1  # each call is a generation of its own
    generate(pipe, n=1, steps=1, size=32)
    assert generate(pipe, n=1, steps=1, size=48).shape == (1, 3, 48, 48)
    assert generate(pipe, n=2, steps=4, size=48).shape == (2, 3, 48, 48)
    assert len(cache.stats.per_step) == 4  # this generation's steps only
    assert cache.stats.computed + cache.stats.reused == 2 * 4


def test_the_step_cache_is_hooks_on_the_model_and_leaves_the_pipeline_alone() -> None:
    pipe = build_tiny_flux(seed=0)
    original = type(pipe)
    enable_step_cache(denoiser_of(pipe), StepCacheOptions(threshold=0.3))
    cache = enable_step_cache(
        denoiser_of(pipe), StepCacheOptions(threshold=0.3)
    )  # again: replaces, not stacks
    assert type(pipe) is original and type(pipe.transformer.transformer_blocks) is torch.nn.ModuleList
    assert "num_inference_steps" in inspect.signature(pipe.__call__).parameters
    assert len(pipe.transformer._diffusers_hook.hooks) == 1
    assert all(len(block._diffusers_hook.hooks) == 1 for block in pipe.transformer.single_transformer_blocks)
    generate(pipe, n=1, steps=4)
    # diffusers resets stateful hooks after each pipeline call: nothing of that generation is left but its stats.
    assert cache.streams._state_cache == {} and len(cache.stats.per_step) == 4
    disable_step_cache(pipe.transformer)
    assert generate(pipe, n=1, steps=2).shape == (1, 3, 32, 32)


def test_disable_step_cache_restores_the_model() -> None:
    eager = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    keys = set(pipe.transformer.state_dict())
    enable_step_cache(pipe.transformer, StepCacheOptions(threshold=0.5))
    assert set(pipe.transformer.state_dict()) == keys  # same children: weights load and save unchanged
    disable_step_cache(pipe.transformer)
    assert step_cache_of(pipe.transformer) is None
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert not any(block._diffusers_hook.hooks for block in blocks)
    assert torch.equal(generate(pipe), eager)


# Step cache on a bare model ----------------------------------------------------------------------------------------
def test_a_unet_gets_no_step_cache_and_the_tier_says_so(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        layers_per_block=1,
    )
    with pytest.raises(ValueError, match="needs FLUX-style transformer blocks"):
        enable_step_cache(unet, StepCacheOptions(threshold=0.1))
    pipe = type("UNetPipeline", (), {"unet": unet})()
    notes = apply_recipe(pipe, recipe_for(Tier.S), device="cpu", cache_dir=str(tmp_path))
    assert any(
        note.startswith("step cache: skipped (no step cache for UNet2DConditionModel") for note in notes
    )
    assert step_cache_of(unet) is None


def transformer_call(model: Any, tokens: int, timestep: float) -> torch.Tensor:
    """One call of a bare FLUX-style transformer on `tokens` image tokens (3 text tokens, batch 1)."""
    config = model.config
    image_ids = torch.zeros(tokens, 3)
    return model(
        hidden_states=torch.randn(1, tokens, config.in_channels),
        encoder_hidden_states=torch.randn(1, 3, config.joint_attention_dim),
        pooled_projections=torch.randn(1, config.pooled_projection_dim),
        timestep=torch.tensor([timestep]),
        img_ids=image_ids,
        txt_ids=torch.zeros(3, 3),
        return_dict=False,
    )[0]


def test_bare_model_streams_check_the_whole_shape_and_stay_bounded() -> None:
    model = build_tiny_flux(seed=0).transformer
    cache = enable_step_cache(model, StepCacheOptions(threshold=0.9, warmup_steps=1, max_consecutive=5))
    # Same batch, another size at the next timestep: that step must not reuse the first size's cache.
    transformer_call(model, 16, 0.9)
    out = transformer_call(model, 36, 0.8)
    assert out.shape[1] == 36 and cache.stats.reused == 0
    # A timestep that does not fall starts a new generation: state never grows across calls.
    for _ in range(10):
        transformer_call(model, 16, 0.9)
    assert len(cache.stats.per_step) == 1


# Compile cache (files only; compiling itself is a GPU test) ---------------------------------------------------------
@pytest.fixture
def compile_globals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`configure_compile_cache` sets process globals: restore them so later tests see the defaults."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setattr(compile_module, "_ARTIFACT_KEY", compile_module._ARTIFACT_KEY)
    with dynamo_config_restored():
        yield


@pytest.mark.usefixtures("compile_globals")
def test_compile_cache_handles_missing_and_corrupt_files(tmp_path: Path) -> None:
    notes: list[str] = []
    configure_compile_cache(str(tmp_path), "key", notes)
    assert "none yet" in notes[-1]
    (tmp_path / "compile" / "key.bin").write_bytes(b"not a cache")
    configure_compile_cache(str(tmp_path), "key", notes)
    assert "not loaded" in notes[-1]  # a corrupt file never stops a start


@pytest.mark.usefixtures("compile_globals")
def test_compiled_tiers_pick_their_kernels_without_timing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inductor's deterministic mode, so a start from artefacts computes what a compiling start did; an
    operator's own TORCHINDUCTOR_DETERMINISTIC is left alone."""
    inductor_config: Any = torch._inductor.config
    inductor_config.deterministic = False
    monkeypatch.delenv("TORCHINDUCTOR_DETERMINISTIC", raising=False)
    notes: list[str] = []
    configure_compile_cache(str(tmp_path), "key", notes)
    assert inductor_config.deterministic is True
    assert notes[0].startswith("inductor: deterministic mode (")  # the worker's start-up log says so
    inductor_config.deterministic = False
    monkeypatch.setenv("TORCHINDUCTOR_DETERMINISTIC", "0")
    notes.clear()
    configure_compile_cache(str(tmp_path), "key", notes)
    assert inductor_config.deterministic is False
    assert notes[0].startswith("inductor: deterministic mode off")


@pytest.mark.usefixtures("compile_globals")
def test_compile_cache_save_is_atomic_beside_other_writers_and_never_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(compile_module, "_ARTIFACT_KEY", "key")
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artefacts", None))
    # Another writer's half-written file (another worker, or a process of another container) is left alone.
    (tmp_path / "compile").mkdir()
    (tmp_path / "compile" / "key.bin.1.tmp").write_bytes(b"someone else's")
    path = save_compile_cache(str(tmp_path))
    assert path == str(tmp_path / "compile" / "key.bin")
    assert Path(path).read_bytes() == b"artefacts"
    assert Path(path).stat().st_mode & 0o777 == 0o644  # readable by another user sharing the volume
    assert sorted(p.name for p in (tmp_path / "compile").iterdir()) == ["key.bin", "key.bin.1.tmp"]
    # A write that fails is logged, not raised: the cache only saves start-up time.
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"a file where the compile folder should be")
    with caplog.at_level(logging.WARNING, logger=compile_module.__name__):
        assert save_compile_cache(str(blocked)) is None
    assert "compile cache: not saved" in caplog.text


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
    from diffuserve.models.random_weights import build_random_pipeline, count_params, param_report

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
    from diffuserve.models.random_weights import arch_for_repo

    assert arch_for_repo("black-forest-labs/FLUX.1-schnell") == "flux-schnell"
    with pytest.raises(ValueError, match=r"FLUX\.1-dev"):
        arch_for_repo("some/other-model")


def test_a_cache_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "key.bin"
    path.write_bytes(b"the last start's")

    def torn(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, torn, ".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["key.bin"]
    assert path.read_bytes() == b"the last start's"
