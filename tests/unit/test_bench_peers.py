"""benchmarks/peers.py on CPU: the registry, a missing library, the PSNR math, the recipes on a tiny FLUX pipeline."""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from benchmarks import peers

from diffuserve.models.tiny_flux import build_tiny_flux


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def generate(pipe: Any, steps: int = 12) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        ["a 7"],
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=[torch.Generator().manual_seed(0)],
        output_type="pt",
        max_sequence_length=32,
    ).images


# The registry -------------------------------------------------------------------------------------------------------
def test_peer_names_are_told_apart_from_tiers_and_unknown_ones_refused() -> None:
    assert peers.is_peer("torchao") and peers.is_peer("cache-dit")
    assert not any(peers.is_peer(tier) for tier in ("E", "XL", "L", "L/CUDA_GRAPHS=off", "family"))
    assert peers.peer_for("cache-dit").module == "cache_dit"
    with pytest.raises(ValueError, match=r"unknown peer 'tensorrt'.*torchao, cache-dit"):
        peers.peer_for("tensorrt")
    with pytest.raises(ValueError, match="takes no setting"):
        peers.peer_for("torchao/CUDA_GRAPHS=off")


def test_a_peer_row_names_recipe_source_settings_and_version() -> None:
    row = peers.describe("torchao")
    assert row["peer"] == "torchao" and "max-autotune" in row["recipe"]
    assert "flux-fast" in row["source"] and row["settings"]["inductor"]["epilogue_fusion"] is False
    assert isinstance(row["peer_version"], str)
    assert peers.describe("cache-dit")["settings"]["DBCacheConfig"]["residual_diff_threshold"] == 0.12
    assert peers.describe("XL") == {} and peers.describe("torchao/x") == {}


def test_a_missing_library_is_a_reason_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # `import cache_dit` now raises ImportError
    why = peers.unavailable(peers.PEERS["cache-dit"])
    assert why is not None and why.startswith("cache-dit is not importable: ")
    absent = peers.Peer("nope", "no_such_module_here", "no-such-dist", "", "", {}, setup=lambda p, c: [])
    assert "ModuleNotFoundError" in (peers.unavailable(absent) or "")
    assert peers.library_version("no-such-dist") == "absent"


# PSNR ---------------------------------------------------------------------------------------------------------------
def test_psnr_math() -> None:
    reference = torch.zeros(3, 4, 4)
    assert peers.psnr_db(reference, reference) == math.inf
    # MSE 0.01 at peak 1: 20 dB; every tenfold drop of the MSE adds 10 dB.
    assert peers.psnr_db(reference + 0.1, reference) == pytest.approx(20.0)
    assert peers.psnr_db(reference + 0.01, reference) == pytest.approx(40.0)
    assert peers.psnr_db(reference + 25.5, reference, peak=255.0) == pytest.approx(20.0)
    half = reference.clone()
    half[0] = 0.3  # a third of the values off by 0.3: MSE 0.03
    assert peers.psnr_db(half, reference) == pytest.approx(10 * math.log10(1 / 0.03))
    with pytest.raises(ValueError, match="shapes differ"):
        peers.psnr_db(torch.zeros(3, 4, 4), torch.zeros(3, 4, 5))


# The recipes --------------------------------------------------------------------------------------------------------
def test_compile_settings_come_back_after_a_peer() -> None:
    inductor = torch._inductor.config
    before = (inductor.conv_1x1_as_mm, inductor.epilogue_fusion, torch.get_float32_matmul_precision())
    with peers.compile_settings_restored():
        inductor.conv_1x1_as_mm = not before[0]
        inductor.epilogue_fusion = not before[1]
        torch._dynamo.config.recompile_limit += 1000
        torch.set_float32_matmul_precision("medium" if before[2] != "medium" else "high")
    after = (inductor.conv_1x1_as_mm, inductor.epilogue_fusion, torch.get_float32_matmul_precision())
    assert after == before
    assert torch._dynamo.config.recompile_limit < 1000


def test_a_peer_starts_from_torch_defaults_not_the_engine_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled tier measured earlier in the process turned on inductor's deterministic mode and static
    shapes; a peer runs its own recipe without them, and the tiers after it get them back."""
    monkeypatch.delenv("TORCHINDUCTOR_DETERMINISTIC", raising=False)
    inductor: Any = torch._inductor.config
    dynamo: Any = torch._dynamo.config
    before = (inductor.deterministic, dynamo.automatic_dynamic_shapes)
    try:
        inductor.deterministic, dynamo.automatic_dynamic_shapes = True, False
        seen: list[tuple[bool, bool]] = []

        def setup(pipe: Any, compile: bool) -> list[str]:
            seen.append((inductor.deterministic, dynamo.automatic_dynamic_shapes))
            return []

        peer = peers.Peer("probe", "probe", "probe", "", "", {}, setup)
        with peers.applied(peer, object()):
            pass
        assert seen == [(False, True)]
        assert (inductor.deterministic, dynamo.automatic_dynamic_shapes) == (True, False)
    finally:
        inductor.deterministic, dynamo.automatic_dynamic_shapes = before


def fake_torchao(monkeypatch: pytest.MonkeyPatch, with_class: bool) -> list[tuple[str, str]]:
    """torchao.quantization as far as the recipe uses it (the real one needs an fp8 GPU); records quantize_."""
    quantized: list[tuple[str, str]] = []

    class Float8DynamicActivationFloat8WeightConfig:
        pass

    def float8_dynamic_activation_float8_weight() -> Any:
        return types.SimpleNamespace()

    quantization = types.ModuleType("torchao.quantization")
    quantization.__spec__ = importlib.machinery.ModuleSpec("torchao.quantization", None)
    quantization.quantize_ = lambda model, config: quantized.append(  # type: ignore[attr-defined]
        (type(model).__name__, type(config).__name__)
    )
    if with_class:
        quantization.Float8DynamicActivationFloat8WeightConfig = Float8DynamicActivationFloat8WeightConfig  # type: ignore[attr-defined]
    else:
        quantization.float8_dynamic_activation_float8_weight = float8_dynamic_activation_float8_weight  # type: ignore[attr-defined]
    package = types.ModuleType("torchao")
    package.__spec__ = importlib.machinery.ModuleSpec("torchao", None, is_package=True)
    package.quantization = quantization  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchao", package)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    return quantized


def test_torchao_recipe_order_flags_and_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = build_tiny_flux(seed=0)
    quantized = fake_torchao(monkeypatch, with_class=True)
    compiled: list[dict[str, Any]] = []

    def compile(fn: Any, **options: Any) -> Any:
        compiled.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", compile)
    flags_before = torch._inductor.config.conv_1x1_as_mm
    with peers.applied(peers.PEERS["torchao"], pipe) as notes:
        assert quantized == [("FluxTransformer2DModel", "Float8DynamicActivationFloat8WeightConfig")]
        assert compiled == [{"mode": "max-autotune", "fullgraph": True}] * 2  # the transformer, vae.decode
        assert torch._inductor.config.conv_1x1_as_mm and not torch._inductor.config.epilogue_fusion
        assert pipe.transformer.transformer_blocks[0].attn.fused_projections
        assert "VAE" in notes[0]
        assert torch.isfinite(generate(pipe, steps=2)).all()  # fused, channels_last: still runs
    assert torch._inductor.config.conv_1x1_as_mm == flags_before


def test_torchao_falls_back_to_the_older_function(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torchao(monkeypatch, with_class=False)
    assert isinstance(peers.float8_config(), types.SimpleNamespace)


def test_cache_dit_caches_then_gives_the_pipeline_class_back() -> None:
    pytest.importorskip("cache_dit")
    reference = generate(build_tiny_flux(seed=0))
    pipe = build_tiny_flux(seed=0)
    call = type(pipe).__call__
    peer = peers.peer_for("cache-dit")
    assert peers.unavailable(peer) is None
    # Without compile: the cache alone (compiling on CPU takes half a minute).
    with peers.applied(peer, pipe, compile=False) as notes:
        assert type(pipe).__call__ is not call  # cache-dit wraps the class's __call__
        assert "residual_diff_threshold=0.12" in notes[0]
        images = generate(pipe)
        assert peers.psnr_db(images[0], reference[0]) > 40  # first steps always computed; few if any reused
        assert isinstance(peer.stats(pipe)["cached_steps"], list)
    assert type(pipe).__call__ is call
