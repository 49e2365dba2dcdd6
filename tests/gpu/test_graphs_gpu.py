"""CUDA graphs on one GPU (tier XL, where CUDA_GRAPHS=auto turns them on): replayed denoiser calls give exactly
the images of the same compiled calls run one by one, for every batch size, on FLUX (the digits model) and on
SDXL's UNet."""

from __future__ import annotations

import tempfile

import pytest
import torch

from diffuserve.types import BatchItem, BatchJob, Tier
from tests.helpers import dynamo_config_restored, engine_config, run_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def job(seeds: list[int], steps: int = 8) -> BatchJob:
    items = [BatchItem(f"r{i}", "the digit 4", None, [seed], "png", None) for i, seed in enumerate(seeds)]
    return BatchJob(1, 32, 32, steps, 0.0, items)


def test_replayed_calls_give_the_same_images_as_the_compiled_calls_alone() -> None:
    from diffuserve.engine.engine import Engine

    cache = tempfile.mkdtemp(prefix="diffuserve-gpu-graphs-")
    engine = Engine(engine_config(tier=Tier.XL, max_batch=2, cache_dir=cache), "cuda:0")
    engine.load()
    engine.warmup()
    hook = engine._graphs
    assert hook is not None and hook.disabled is None
    # Warm-up ran both batch sizes twice or more: their graphs are there before the first request.
    assert len(hook.graphs) == 2
    replayed_before = hook.replays
    with_graphs = {seeds: run_engine(engine, job(list(seeds))) for seeds in ((1,), (2, 3))}
    assert hook.replays - replayed_before == 2 * 8
    hook.disabled = "off for the comparison"
    alone = {seeds: run_engine(engine, job(list(seeds))) for seeds in ((1,), (2, 3))}
    for seeds, result in with_graphs.items():
        assert result.error is None and alone[seeds].error is None
        for (replayed,), (compiled,) in zip(result.images, alone[seeds].images, strict=True):
            assert replayed.data == compiled.data, f"seeds {seeds}: a replayed image differs"
    engine.close()
    assert not hook.graphs


def test_sdxl_replays_its_unet_and_gives_the_compiled_images() -> None:
    from diffuserve.engine.config import Weights
    from diffuserve.engine.engine import Engine

    cache = tempfile.mkdtemp(prefix="diffuserve-gpu-graphs-sdxl-")
    config = engine_config(
        model_repo="stabilityai/stable-diffusion-xl-base-1.0", weights=Weights.RANDOM, tier=Tier.XL, max_batch=1,
        cache_dir=cache,
    )  # fmt: skip
    with dynamo_config_restored():
        engine = Engine(config, "cuda:0")
        engine.load()
        hook = engine._graphs
        assert hook is not None
        item = BatchItem("r", "a fox", None, [3], "png", None)
        sdxl_job = BatchJob(1, 256, 256, 4, 5.0, [item])
        results = [run_engine(engine, sdxl_job) for _ in range(3)]  # compiled, captured, replayed
        assert hook.disabled is None and hook.replays > 0
        hook.disabled = "off for the comparison"
        alone = run_engine(engine, sdxl_job)
        engine.close()
    assert all(result.error is None for result in results) and alone.error is None
    assert results[2].images[0][0].data == alone.images[0][0].data
