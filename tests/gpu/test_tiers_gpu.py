"""Acceleration tiers on a CUDA GPU: each tier compiles and runs, XL stays within bf16 noise, caches persist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from diffuserve.engine.tiers import Tier, apply_recipe, recipe_for, save_compile_cache, step_cache_of
from diffuserve.engine.tiers.quantize import fp8_available
from diffuserve.models.tiny_flux import build_tiny_flux
from tests.helpers import dynamo_config_restored

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _own_compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test compiles into its own tmp_path (`configure_compile_cache` only fills these in when unset, so
    without this every test would use the first one's), and the process globals it sets are restored."""
    from diffuserve.engine.tiers import compile as compile_module

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile" / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "compile" / "triton"))
    monkeypatch.setattr(compile_module, "_ARTIFACT_KEY", compile_module._ARTIFACT_KEY)
    with dynamo_config_restored():
        yield


def generate(pipe: Any, steps: int = 8) -> torch.Tensor:
    n = 4
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            ["the digit 3", "a 7", "nine", "zero"][:n],
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=[torch.Generator().manual_seed(i) for i in range(n)],
            output_type="pt",
            max_sequence_length=32,
        ).images.float()


def tiny(dtype: torch.dtype) -> Any:
    return build_tiny_flux(seed=0).to("cuda", dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_xl_is_within_bf16_noise_of_eager(tmp_path: Path) -> None:
    fp32 = generate(tiny(torch.float32))
    eager = generate(tiny(torch.bfloat16))
    pipe = tiny(torch.bfloat16)
    notes = apply_recipe(pipe, recipe_for(Tier.XL), device="cuda", cache_dir=str(tmp_path))
    assert any("torch.compile (regional" in n for n in notes)
    xl = generate(pipe)
    # The threshold is the bf16 noise floor itself: eager bf16's own distance from fp32 (plus a small margin).
    floor = rel_err(eager, fp32)
    assert rel_err(xl, eager) <= 2 * floor + 1e-3, (rel_err(xl, eager), floor)


@pytest.mark.parametrize("tier", [Tier.L, Tier.M, Tier.S])
def test_lossy_tiers_run_and_stay_finite(tier: Tier, tmp_path: Path) -> None:
    pipe = tiny(torch.bfloat16)
    notes = "\n".join(apply_recipe(pipe, recipe_for(tier), device="cuda", cache_dir=str(tmp_path)))
    if fp8_available("cuda")[0]:
        assert "fp8 e4m3 row-wise" in notes
    images = generate(pipe)
    assert torch.isfinite(images).all()
    if tier is not Tier.L:
        assert step_cache_of(pipe.transformer) is not None


def test_compile_cache_is_saved_after_warmup(tmp_path: Path) -> None:
    pipe = tiny(torch.bfloat16)
    apply_recipe(pipe, recipe_for(Tier.XL), device="cuda", cache_dir=str(tmp_path))
    generate(pipe, steps=2)
    path = save_compile_cache(str(tmp_path))
    assert path is not None and Path(path).stat().st_size > 0


def test_random_sdxl_builds_on_the_gpu_and_runs() -> None:
    from diffuserve.models.random_weights import build_random_pipeline

    pipe = build_random_pipeline(
        "stabilityai/stable-diffusion-xl-base-1.0", device="cuda", dtype=torch.bfloat16
    )
    assert pipe.unet.device.type == "cuda"
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe("a red fox", height=256, width=256, num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 256, 256)
