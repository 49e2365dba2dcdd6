"""Calibrated fp8 rounding (GPTQ, FP8_ROUNDING=calibrated): its codes, the cache, and the tier's wiring, on CPU."""

from __future__ import annotations

import os
import time
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
    FEW_ROWS_DAMP,
    STALE_PARTIAL_S,
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


def torchao_rowwise(w: torch.Tensor) -> torch.Tensor:
    """torchao 0.17's row-wise fp8 of a weight (`_choose_scale_float8`, `_quantize_affine_float8`): the row's
    largest magnitude divided by 448 in the weight's own dtype, then the float32 weight over that scale,
    clamped and cast to e4m3."""
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).float()
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def test_rounded_weights_round_back_to_exactly_gptq_codes() -> None:
    """What torchao's row-wise quantization does next finds GPTQ's codes in the weights written back in bf16."""
    w = weight()
    x = correlated_inputs(512, w.shape[1])
    rounded = gptq_round(w, x.T @ x)
    assert rounded is not None
    codes, scale = rounded
    written = rounded_weight(codes, scale, torch.bfloat16)
    assert torch.allclose(row_scales(written), scale, rtol=2**-8)
    assert torch.equal(torchao_rowwise(written), codes)
    assert torch.equal(e4m3_codes(written.float() / row_scales(written)), codes)
    assert torch.equal(codes.abs().amax(dim=1), torch.full((w.shape[0],), E4M3_MAX))
    assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)  # e4m3 values, nothing between


def test_gptq_moves_the_outputs_less_than_nearest_rounding() -> None:
    w = weight()
    x = correlated_inputs(512, w.shape[1], seed=1)
    held_out = correlated_inputs(256, w.shape[1], seed=7)  # the same distribution, other samples
    rounded = gptq_round(w, x.T @ x)
    assert rounded is not None
    codes, scale = rounded
    exact = held_out @ w.float().T
    gptq_error = (held_out @ (codes * scale).T - exact).norm()
    nearest_error = (held_out @ nearest(w).T - exact).norm()
    assert gptq_error < 0.8 * nearest_error


def test_inputs_that_are_always_zero_do_not_break_the_rounding() -> None:
    w = weight()
    x = correlated_inputs(256, w.shape[1])
    x[:, :4] = 0
    rounded = gptq_round(w, x.T @ x)
    assert rounded is not None
    codes, scale = rounded
    assert torch.isfinite(codes).all() and torch.isfinite(scale).all()
    assert torch.equal(codes[:, :4], e4m3_codes(w[:, :4].float() / scale))  # nothing to weigh: nearest


def test_statistics_that_are_not_finite_give_no_rounding() -> None:
    w = weight()
    h = torch.eye(w.shape[1])
    h[2, 2] = float("nan")
    assert gptq_round(w, h) is None


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
    assert calls.count == 1 and "2 of 2 layers (any other nearest) from 1 calibration run(s)" in notes[-1]
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


def test_few_samples_with_strong_damping_still_beat_nearest_rounding_on_other_samples() -> None:
    """16 input rows for 64 features, FEW_ROWS_DAMP: GPTQ does not overfit them (other samples of the same
    distribution move less than under nearest rounding)."""
    for seed in range(5):
        w = weight(seed=10 + seed)
        few = correlated_inputs(16, w.shape[1], seed=seed)
        held_out = correlated_inputs(512, w.shape[1], seed=100 + seed)
        rounded = gptq_round(w, few.T @ few, damp=FEW_ROWS_DAMP)
        assert rounded is not None
        exact = held_out @ w.float().T
        gptq_error = (held_out @ (rounded[0] * rounded[1]).T - exact).norm()
        assert gptq_error < 0.95 * (held_out @ nearest(w).T - exact).norm()


def test_a_cache_that_cannot_be_written_is_said_and_not_fatal(tmp_path: Path) -> None:
    model, layers = two_layers()
    (tmp_path / "fp8-rounding").write_text("a file where the folder should be")
    notes: list[str] = []
    calibrate_fp8(layers, Calls(model), cache_dir=str(tmp_path), context="test", notes=notes)
    assert notes[-1].endswith("not cached")


def test_a_cache_file_for_other_layers_is_calibrated_again(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, layers = two_layers()
    path = tmp_path / "fp8-rounding" / f"{fingerprint(layers, 'test')}.safetensors"
    path.parent.mkdir(parents=True)
    save_file({"9.codes": torch.zeros(4, 4), "9.scale": torch.ones(4, 1)}, str(path))
    calls, notes = Calls(model), []
    calibrate_fp8(layers, calls, cache_dir=str(tmp_path), context="test", notes=notes)
    assert calls.count == 1 and "2 of 2 layers" in notes[-1]


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


def test_a_stopped_writers_temporary_file_is_removed_and_a_fresh_one_kept(tmp_path: Path) -> None:
    model, layers = two_layers()
    folder = tmp_path / "fp8-rounding"
    folder.mkdir()
    stale, fresh = folder / "old.safetensors.1.partial", folder / "new.safetensors.2.partial"
    for partial in (stale, fresh):
        partial.write_bytes(b"half a file")
    hour_ago = time.time() - STALE_PARTIAL_S - 1
    os.utime(stale, (hour_ago, hour_ago))
    calibrate_fp8(layers, Calls(model), cache_dir=str(tmp_path), context="test", notes=[])
    assert not stale.exists() and fresh.exists()  # another process may still be writing the fresh one
    assert [p.suffix for p in folder.iterdir() if p != fresh] == [".safetensors"]


def test_float16_or_float32_weights_keep_the_nearest_rounding(tmp_path: Path) -> None:
    model, layers = two_layers()
    model.to(torch.float16)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    calls, notes = Calls(model), []
    calibrate_fp8(layers, calls, cache_dir=str(tmp_path), context="test", notes=notes)
    assert calls.count == 0 and "needs bfloat16 weights, these are float16" in notes[-1]
    assert all(torch.equal(layer.weight, before[name]) for name, layer in layers.items())


def test_a_failed_calibration_leaves_tier_l_on_the_nearest_rounding(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    quantized: list[int] = []
    monkeypatch.setattr(tiers, "fp8_available", lambda device: (True, ""))
    monkeypatch.setattr(tiers, "quantize_fp8", lambda model, layers, notes: quantized.append(len(layers)))
    pipe = build_tiny_flux().to(torch.bfloat16)

    def out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    recipe = recipe_for(Tier.L).__class__(**{**recipe_for(Tier.L).__dict__, "compile": False})
    notes = apply_recipe(
        pipe, recipe, device="cpu", cache_dir=str(tmp_path), family=TINY_FLUX,
        calibration=Calibration(out_of_memory, "test"),
    )  # fmt: skip
    assert any("calibration failed (OutOfMemoryError" in note for note in notes)
    assert quantized == [len(quantizable_linears(pipe.transformer))]  # fp8 still applied, nearest rounding
    assert not list(tmp_path.glob("fp8-rounding/*.safetensors"))


def test_calibration_calls_run_the_family_prompts_in_batches_of_model_batch() -> None:
    pipe = build_tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    seen: list[Any] = []
    pipe.transformer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    calibration = calibration_calls(pipe, TINY_FLUX, 4)
    with torch.no_grad():
        calibration.run()
    batches = [call["hidden_states"].shape[0] for call in seen[:: TINY_FLUX.default_steps]]
    assert len(seen) == 3 * TINY_FLUX.default_steps and batches == [4, 4, 2]  # 10 prompts
    assert "a handwritten digit 7" in calibration.context


def test_tier_l_calibrates_the_layers_it_quantizes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The wiring, with fp8 said available and torchao's step recorded (no fp8 kernel on CPU)."""
    quantized: list[dict[str, torch.Tensor]] = []  # the weights as quantization finds them
    monkeypatch.setattr(tiers, "fp8_available", lambda device: (True, ""))
    monkeypatch.setattr(
        tiers,
        "quantize_fp8",
        lambda model, layers, notes: quantized.append({n: m.weight.clone() for n, m in layers.items()}),
    )
    pipe = build_tiny_flux().to(torch.bfloat16)  # as served on a GPU: calibrated rounding needs bf16 weights
    pipe.set_progress_bar_config(disable=True)
    before = {n: m.weight.clone() for n, m in quantizable_linears(pipe.transformer).items()}
    calibration = calibration_calls(pipe, TINY_FLUX, 4)
    runs: list[int] = []
    counted = Calibration(lambda: (runs.append(1), calibration.run())[0], calibration.context)
    recipe = recipe_for(Tier.L).__class__(**{**recipe_for(Tier.L).__dict__, "compile": False})
    with torch.no_grad():
        notes = apply_recipe(
            pipe, recipe, device="cpu", cache_dir=str(tmp_path), family=TINY_FLUX, calibration=counted
        )
    assert runs == [1] and any("calibrated (GPTQ)" in note for note in notes)
    assert quantized and set(quantized[0]) == set(quantizable_linears(pipe.transformer))
    kept = set(before) & set(quantized[0])  # the layers fused QKV left as they were
    changed = [name for name in kept if not torch.equal(quantized[0][name], before[name])]
    assert changed  # quantization sees the calibrated weights: calibration ran first
    assert list((tmp_path / "fp8-rounding").glob("*.safetensors"))


def test_the_calibration_is_announced_only_where_fp8_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Readiness says "fp8 rounding calibrated" while the calibration runs; it runs only where fp8 does: a
    transformer at an fp8 tier on a device with fp8 kernels and torchao."""
    transformer, unet = type("P", (), {"transformer": nn.Linear(2, 2)})(), type("U", (), {"unet": None})()
    monkeypatch.setattr(tiers, "fp8_available", lambda device: (True, ""))
    assert tiers.fp8_applies(transformer, Tier.L, "cuda:0")
    assert not tiers.fp8_applies(transformer, Tier.XL, "cuda:0")
    assert not tiers.fp8_applies(unet, Tier.L, "cuda:0")
    monkeypatch.setattr(tiers, "fp8_available", lambda device: (False, "compute capability (8, 0)"))
    assert not tiers.fp8_applies(transformer, Tier.L, "cuda:0")
