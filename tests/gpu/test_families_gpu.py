"""Every family's full-size architecture with random weights on a CUDA GPU: built on the device, one 1024² step
through the Engine at E and at XL (compiled), and an edit for the edit families."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuserve.engine.config import DType, Weights
from diffuserve.messages import DeviceBatch
from diffuserve.types import BatchItem, BatchJob, Task, Tier
from tests.helpers import dynamo_config_restored, engine_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPOS = [
    "black-forest-labs/FLUX.1-Kontext-dev",
    "stabilityai/stable-diffusion-3.5-large",
    "stabilityai/stable-diffusion-3.5-medium",
    "Qwen/Qwen-Image",
    "Qwen/Qwen-Image-Edit",
    "Tongyi-MAI/Z-Image-Turbo",
    "black-forest-labs/FLUX.2-klein-4B",
]
SIZE = 1024


@pytest.fixture(autouse=True)
def _own_compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from diffuserve.engine.tiers import compile as compile_module

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile" / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "compile" / "triton"))
    monkeypatch.setattr(compile_module, "_ARTIFACT_KEY", compile_module._ARTIFACT_KEY)
    with dynamo_config_restored():
        yield
    torch._dynamo.reset()
    # A pipeline's modules hold reference cycles (hooks): collected now, the next family finds the card empty.
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("tier", [Tier.E, Tier.XL])
@pytest.mark.parametrize("repo", REPOS)
def test_full_family_runs_a_1024_step(repo: str, tier: Tier, tmp_path: Path) -> None:
    from diffuserve.engine.engine import Engine

    config = engine_config(
        model_repo=repo, model_name=repo, weights=Weights.RANDOM, tier=tier, max_batch=1,
        dtype=DType.BFLOAT16, cache_dir=str(tmp_path),
    )  # fmt: skip
    engine = Engine(config, "cuda:0")
    info = engine.load()
    assert engine.pipeline.transformer.device.type == "cuda"
    item = BatchItem("r", "a red fox in the snow", None, [1], "png", None)
    for _ in range(2):  # the first call compiles (XL), the second runs what is served
        computed = engine.compute(BatchJob(1, SIZE, SIZE, 1, info.default_guidance, [item]))
        assert isinstance(computed, DeviceBatch), computed
    assert computed.pixels.shape == (1, SIZE, SIZE, 3)
    if Task.IMAGE_TO_IMAGE in info.edit_tasks and tier is Tier.E:
        picture = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        edit = BatchItem("e", "make it blue", None, [2], "png", None, init_images=[picture])
        edited = engine.compute(
            BatchJob(2, SIZE, SIZE, 1, info.default_guidance, [edit], Task.IMAGE_TO_IMAGE)
        )
        if not isinstance(edited, DeviceBatch) and "out of memory" in str(edited.error):
            # Qwen-Image-Edit in bf16 (20 B transformer, 8 B encoder and the picture's tokens) needs more than
            # an 80 GB card; tier L (fp8) runs it there (docs/benchmarks.md).
            pytest.skip(f"{repo}'s edit in bf16 does not fit {torch.cuda.get_device_name()}")
        assert isinstance(edited, DeviceBatch), edited
        assert edited.pixels.shape == (1, SIZE, SIZE, 3)
    engine.close()
