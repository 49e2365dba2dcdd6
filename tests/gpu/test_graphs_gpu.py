"""CUDA graphs on one GPU (CUDA_GRAPHS=on, tier XL, digits model): replayed denoiser calls give exactly the
images of the same compiled calls run one by one, for every batch size."""

from __future__ import annotations

import tempfile

import pytest
import torch

from diffuserve.config import Settings
from diffuserve.types import BatchItem, BatchJob

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
    settings = Settings(
        model_repo="digits", model_size="XL", model_batch=2, cuda_graphs="on", cache_dir=cache
    )
    engine = Engine(settings, "cuda:0")
    engine.load()
    engine.warmup()
    hook = engine._graphs
    assert hook is not None and hook.disabled is None
    # Warm-up ran both batch sizes twice or more: their graphs are there before the first request.
    assert len(hook.graphs) == 2
    replayed_before = hook.replays
    with_graphs = {seeds: engine.run(job(list(seeds))) for seeds in ((1,), (2, 3))}
    assert hook.replays - replayed_before == 2 * 8
    hook.disabled = "off for the comparison"
    alone = {seeds: engine.run(job(list(seeds))) for seeds in ((1,), (2, 3))}
    for seeds, result in with_graphs.items():
        assert result.error is None and alone[seeds].error is None
        for (replayed,), (compiled,) in zip(result.images, alone[seeds].images, strict=True):
            assert replayed.data == compiled.data, f"seeds {seeds}: a replayed image differs"
    engine.close()
    assert not hook.graphs
