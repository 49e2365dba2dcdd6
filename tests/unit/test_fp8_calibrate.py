"""Calibrated fp8 rounding (GPTQ, FP8_ROUNDING=calibrated): its codes, the cache, and the tier's wiring, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import diffuserve.engine.tiers as tiers
from diffuserve.engine.calls import calibration_calls
from diffuserve.engine.tiers import Calibration, apply_recipe, recipe_for
from diffuserve.engine.tiers.calibrate import (
    E4M3_MAX,
    calibrate_fp8,
    e4m3_codes,
    fingerprint,
    gptq_round,
    hessian_groups,
    rounded_weight,
    row_scales,
)
from diffuserve.engine.tiers.quantize import quantizable_linears
from diffuserve.models.tiny_flux import build_tiny_flux
from diffuserve.types import TINY_FLUX, Tier


def correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are mixed and of unequal size, as a layer's inputs are (GPTQ's case); `seed`
    draws other samples of the same distribution."""
    mixing = torch.randn(features, features, generator=torch.Generator().manual_seed(0)) / features**0.5
    sizes = torch.logspace(0, 1.5, features)
    return (torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)) * sizes) @ mixing


def weight(rows: int = 48, columns: int = 64, seed: int = 1) -> torch.Tensor:
    w = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0, 5] = 0.5  # an outlier: its row's scale is set by it
    return w.to(torch.bfloat16)


def nearest(w: torch.Tensor) -> torch.Tensor:
    scale = row_scales(w)
    return e4m3_codes(w.float() / scale) * scale


def test_rounded_weights_round_back_to_exactly_gptq_codes() -> None:
    """What torchao's row-wise quantization does next (scale from the row's largest magnitude, nearest e4m3
    value) finds GPTQ's codes in the weights written back in bf16."""
    w = weight()
    x = correlated_inputs(512, w.shape[1])
    codes, scale = gptq_round(w, x.T @ x)
    written = rounded_weight(codes, scale, torch.bfloat16)
    again = row_scales(written)
    assert torch.allclose(again, scale, rtol=2**-8)
    assert torch.equal(e4m3_codes(written.float() / again), codes)
    assert torch.equal(codes.abs().amax(dim=1), torch.full((w.shape[0],), E4M3_MAX))
    assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)  # e4m3 values, nothing between


def test_gptq_moves_the_outputs_less_than_nearest_rounding() -> None:
    w = weight()
    x = correlated_inputs(512, w.shape[1], seed=1)
    held_out = correlated_inputs(256, w.shape[1], seed=7)  # the same distribution, other samples
    codes, scale = gptq_round(w, x.T @ x)
    exact = held_out @ w.float().T
    gptq_error = (held_out @ (codes * scale).T - exact).norm()
    nearest_error = (held_out @ nearest(w).T - exact).norm()
    assert gptq_error < 0.8 * nearest_error


def test_inputs_that_are_always_zero_do_not_break_the_rounding() -> None:
    w = weight()
    x = correlated_inputs(256, w.shape[1])
    x[:, :4] = 0
    codes, scale = gptq_round(w, x.T @ x)
    assert torch.isfinite(codes).all() and torch.isfinite(scale).all()


def test_groups_of_second_moments_fit_the_budget() -> None:
    layers = {f"l{i}": nn.Linear(size, 16) for i, size in enumerate([32, 32, 64, 32])}
    groups = list(hessian_groups(layers, budget_bytes=4 * (32**2 + 32**2)))
    assert groups == [["l0", "l1"], ["l2"], ["l3"]]  # l2 alone is over the budget: a group of its own


def two_layers() -> tuple[nn.Sequential, dict[str, nn.Linear]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).to(torch.bfloat16)
    return model, {"0": model[0], "2": model[2]}  # type: ignore[dict-item]


class Calls:
    """The calibration calls of `two_layers`, counted."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.count = model, 0
        self.x = correlated_inputs(128, 32).to(torch.bfloat16)

    def __call__(self) -> None:
        self.count += 1
        self.model(self.x)


def test_calibration_is_cached_and_read_back(tmp_path: Path) -> None:
    model, layers = two_layers()
    originals = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    calls, notes = Calls(model), []
    calibrate_fp8(layers, calls, cache_dir=str(tmp_path), context="test", notes=notes)
    assert calls.count == 1 and "2 of 2 layers from 1 calibration run(s)" in notes[-1]
    calibrated = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    assert not torch.equal(calibrated["0"], originals["0"])
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.copy_(originals[name])
    calibrate_fp8(layers, calls, cache_dir=str(tmp_path), context="test", notes=notes)
    assert calls.count == 1 and "read from" in notes[-1]  # no calibration call the second time
    for name, layer in layers.items():
        assert torch.equal(layer.weight, calibrated[name])


def test_a_small_budget_calibrates_layer_groups_in_turn(tmp_path: Path) -> None:
    model, layers = two_layers()
    calls = Calls(model)
    calibrate_fp8(layers, calls, cache_dir=str(tmp_path), context="test", notes=[], budget_bytes=1)
    assert calls.count == 2  # one run for each layer's statistics


def test_other_weights_or_calls_get_another_cache_key() -> None:
    _, layers = two_layers()
    key = fingerprint(layers, "a")
    assert fingerprint(layers, "b") != key
    with torch.no_grad():
        layers["2"].weight[3, 3] += 1.0
    assert fingerprint(layers, "a") != key


def test_a_torn_cache_file_is_calibrated_again(tmp_path: Path) -> None:
    model, layers = two_layers()
    calls = Calls(model)
    path = tmp_path / "fp8-rounding" / f"{fingerprint(layers, 'test')}.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    notes: list[str] = []
    calibrate_fp8(layers, calls, cache_dir=str(tmp_path), context="test", notes=notes)
    assert calls.count == 1 and "cached in" in notes[-1]
    assert path.stat().st_size > 100


def test_calibration_calls_run_the_family_prompts_to_latents() -> None:
    pipe = build_tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    seen: list[Any] = []
    pipe.transformer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    calibration = calibration_calls(pipe, TINY_FLUX)
    with torch.no_grad():
        calibration.run()
    assert len(seen) == TINY_FLUX.default_steps
    assert seen[0]["hidden_states"].shape[0] == len(TINY_FLUX.calibration_prompts)
    assert "a handwritten digit 7" in calibration.context


def test_tier_l_calibrates_the_layers_it_quantizes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The wiring, with fp8 said available and torchao's step recorded (no fp8 kernel on CPU)."""
    quantized: list[dict[str, nn.Linear]] = []
    monkeypatch.setattr(tiers, "fp8_available", lambda device: (True, ""))
    monkeypatch.setattr(tiers, "quantize_fp8", lambda model, layers, notes: quantized.append(layers))
    pipe = build_tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    calibration = calibration_calls(pipe, TINY_FLUX)
    runs: list[int] = []
    counted = Calibration(lambda: (runs.append(1), calibration.run())[0], calibration.context)
    recipe = recipe_for(Tier.L).__class__(**{**recipe_for(Tier.L).__dict__, "compile": False})
    with torch.no_grad():
        notes = apply_recipe(
            pipe, recipe, device="cpu", cache_dir=str(tmp_path), family=TINY_FLUX, calibration=counted
        )
    assert runs == [1] and any("calibrated (GPTQ)" in note for note in notes)
    assert quantized and set(quantized[0]) == set(quantizable_linears(pipe.transformer))
    assert list((tmp_path / "fp8-rounding").glob("*.safetensors"))
