"""FLUX's AdaLN modulation from per-call tables: the same images as the products made at each step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxImg2ImgPipeline

from diffuserve.engine.tiers.modulation import ROWS_BUFFER, TABLES_HOOK, enable_step_modulation, norm_linears
from diffuserve.models.tiny_flux import TinyFluxConfig, build_tiny_flux


@pytest.fixture(autouse=True)
def _no_grad() -> Any:
    with torch.no_grad():
        yield


def step_modulation_of(model: Any) -> Any:
    registry = getattr(model, "_diffusers_hook", None)
    return registry.get_hook(TABLES_HOOK) if registry is not None else None


def flux(guidance: bool = True) -> Any:
    pipe = build_tiny_flux(TinyFluxConfig(layers=2, single_layers=2, guidance_embeds=guidance), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, prompts: list[str], steps: int = 6, seed: int = 0, **extra: Any) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(  # type: ignore[no-any-return]
        prompts,
        height=32,
        width=32,
        num_inference_steps=steps,
        generator=generators,
        output_type="pt",
        max_sequence_length=32,
        **extra,
    ).images


def test_every_norm_of_a_flux_transformer_is_found_and_only_those() -> None:
    pipe = flux()
    linears = norm_linears(pipe.transformer)
    assert linears is not None
    # Two double blocks with two norms each, two single blocks, the output norm.
    assert len(linears) == 2 * 2 + 2 + 1
    assert norm_linears(pipe.vae) is None
    assert enable_step_modulation(pipe) is not None
    assert all(hasattr(linear, ROWS_BUFFER) and linear._forward_hooks for linear in linears)
    assert enable_step_modulation(pipe) is step_modulation_of(pipe.transformer), "installed once"
    # Parameters keep their names: state dicts load as before.
    assert set(pipe.transformer.state_dict()) == set(flux().transformer.state_dict())


@pytest.mark.parametrize("guidance", [True, False])
def test_calls_in_a_row_give_the_images_of_the_plain_model(guidance: bool) -> None:
    plain, tabled = flux(guidance), flux(guidance)
    tables = enable_step_modulation(tabled)
    assert tables is not None
    # Other prompts, step counts, batch sizes and guidance one after the other: no call sees another's rows.
    calls: list[tuple[list[str], int, dict[str, Any]]] = [
        (["the digit 3", "a 7"], 6, {"guidance_scale": 3.5}),
        (["nine"], 6, {"guidance_scale": 3.5}),
        (["nine"], 40, {"guidance_scale": 1.0}),
        (["zero", "one", "two"], 3, {}),
        (["nine"], 6, {"guidance_scale": 3.5}),
    ]
    for prompts, steps, extra in calls:
        expected = generate(plain, prompts, steps, **extra)
        got = generate(tabled, prompts, steps, **extra)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    steps_run = sum(steps for _, steps, _ in calls)
    assert tables.lookups == steps_run and tables.computed == 0


def test_a_second_call_in_a_step_is_computed_for_itself() -> None:
    """True CFG calls the denoiser again with the negative prompt's embedding in every step."""
    plain, tabled = flux(), flux()
    tables = enable_step_modulation(tabled)
    assert tables is not None
    extra = {"negative_prompt": ["blurry"], "true_cfg_scale": 2.0, "guidance_scale": 3.5}
    expected = generate(plain, ["a 7"], 5, **extra)
    got = generate(tabled, ["a 7"], 5, **extra)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert tables.lookups == 5 and tables.computed == 5


def test_an_edit_pipeline_made_from_it_starts_later_in_the_table() -> None:
    plain, tabled = flux(), flux()
    enable_step_modulation(tabled)
    picture = torch.rand(1, 3, 32, 32)
    results = []
    for pipe in (plain, tabled):
        edit = FluxImg2ImgPipeline.from_pipe(pipe)
        edit.set_progress_bar_config(disable=True)
        results.append(generate(edit, ["a 7"], 8, image=picture, strength=0.5, guidance_scale=3.5))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_a_pipeline_that_passes_timesteps_otherwise_is_computed_at_each_step() -> None:
    plain, tabled = flux(), flux()
    tables = enable_step_modulation(tabled)
    assert tables is not None
    # As if the pipeline converted each step's timestep its own way: both models get the same timesteps.
    cls = type(tabled.transformer)
    original = cls.__call__

    def call(module: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["timestep"] = kwargs["timestep"] * 1.0001
        return original(module, *args, **kwargs)

    cls.__call__ = call  # type: ignore[method-assign]
    try:
        got = generate(tabled, ["a 7"], 4, guidance_scale=3.5)
        expected = generate(plain, ["a 7"], 4, guidance_scale=3.5)
    finally:
        cls.__call__ = original  # type: ignore[method-assign]
    assert tables.lookups == 0 and tables.computed == 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_engine_installs_the_tables_in_every_tier_but_the_reference() -> None:
    from diffuserve.engine.engine import Engine
    from diffuserve.types import Tier
    from tests.helpers import engine_config

    for tier, tabled in ((Tier.E, False), (Tier.L, True)):
        engine = Engine(engine_config(tier=tier, max_batch=1), "cpu")
        engine.load()
        assert (step_modulation_of(engine.pipeline.transformer) is not None) is tabled


def test_rows_sized_for_the_largest_batch_at_once_never_grow() -> None:
    """Warm-up runs batch size 1 before the largest: rows grown afterwards would move the buffer the compiled
    blocks were traced with (and captured graphs read), so every size warm before would compile again."""
    plain, tabled = flux(), flux()
    tables = enable_step_modulation(tabled, batch=4)
    assert tables is not None
    buffers = [rows.current for rows in tables.rows]
    assert all(buffer.shape[0] == 4 for buffer in buffers)
    for prompts in (["one"], ["one", "two", "three", "four"], ["five", "six"]):
        torch.testing.assert_close(generate(tabled, prompts), generate(plain, prompts), rtol=1e-5, atol=1e-5)
    assert all(rows.current is buffer for rows, buffer in zip(tables.rows, buffers, strict=True))
