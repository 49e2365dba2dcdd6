"""Adapters per request on a CUDA GPU, random-weight FLUX.1-dev at tiers XL and L (compiled, CUDA graphs, fp8
in L): swapping adapters recompiles nothing and captures no new graph, an adapter's image is the same however
often others ran between, and a batch row's image does not depend on its neighbours' adapters."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuserve.engine.config import DType, Weights
from diffuserve.messages import DeviceBatch
from diffuserve.types import BatchItem, BatchJob, LoraUse, Tier
from tests.helpers import dynamo_config_restored, engine_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SIZE = 512
STEPS = 2


@pytest.fixture(autouse=True)
def _own_compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile" / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "compile" / "triton"))
    with dynamo_config_restored():
        yield
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("tier", [Tier.XL, Tier.L])
def test_swapping_adapters_recompiles_nothing(tier: Tier, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    from diffuserve.engine.engine import Engine
    from diffuserve.engine.lora.random_adapters import save_random_adapter

    config = engine_config(
        model_repo="black-forest-labs/FLUX.1-dev", model_name="flux", weights=Weights.RANDOM, tier=tier,
        max_batch=2, dtype=DType.BFLOAT16, cache_dir=str(tmp_path), lora_max_rank=64,
    )  # fmt: skip
    engine = Engine(config, "cuda:0")
    info = engine.load()
    uses = [
        LoraUse(
            f"r{rank}",
            str(save_random_adapter(tmp_path / f"{rank}.st", info.lora_targets, rank=rank, seed=rank)),
        )
        for rank in (16, 32, 64)
    ]

    def image(*loras: tuple[LoraUse, ...]) -> np.ndarray:
        items = [
            BatchItem(f"r{i}", "a red fox", None, [7], "png", None, loras=use) for i, use in enumerate(loras)
        ]
        computed = engine.compute(BatchJob(1, SIZE, SIZE, STEPS, info.default_guidance, items))
        assert isinstance(computed, DeviceBatch), computed
        return computed.pixels

    for batch in ((), ()), ((),):  # what the warm-up does: compile, then capture, at each batch size
        for _ in range(2):
            image(*batch)
    graphs = counters["stats"]["unique_graphs"]
    # Two block classes at two batch sizes: a graph per block instance (a guard on something each block holds
    # its own of) would be dozens, and past the recompile limit the rest would run eagerly.
    assert graphs <= 16, f"{graphs} graphs compiled: the regional compile recompiled per block"
    captured = len(engine._graphs.graphs)
    plain = image(())[0]
    first = image((uses[0],))[0]
    for use in uses[1:]:
        image((use,))
    image((uses[1], uses[0]), (uses[2],))
    again = image((uses[0],))[0]
    beside_plain = image((uses[0],), ())[0]
    beside_other = image((uses[0],), (uses[2],))[0]
    assert counters["stats"]["unique_graphs"] == graphs, "an adapter swap recompiled"
    assert len(engine._graphs.graphs) == captured, "an adapter swap captured a new CUDA graph"
    assert np.abs(first.astype(int) - plain.astype(int)).mean() > 1, "the adapter changed nothing"
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(beside_plain, beside_other)
    engine.close()
