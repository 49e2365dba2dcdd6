"""Edits and previews on a CUDA GPU in every tier (compiled, fp8, step cache): image-to-image follows the prompt,
inpainting keeps the unmasked pixels, previews come for the items that asked; SDXL's edit pipelines run too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuserve.messages import DeviceBatch, PreviewBatch
from diffuserve.models.digits.classifier import load_classifier
from diffuserve.types import BatchItem, BatchJob, Task, Tier
from tests.helpers import dynamo_config_restored, engine_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
SEEDS = list(range(8))


@pytest.fixture(autouse=True)
def _restored() -> Iterator[None]:
    with dynamo_config_restored():
        yield


def engine_for(tier: Tier, cache: Path) -> object:
    from diffuserve.engine.engine import Engine

    engine = Engine(engine_config(tier=tier, max_batch=8, cache_dir=str(cache)), "cuda:0")
    engine.load()
    return engine


def threes(engine: object) -> np.ndarray:
    from diffuserve.engine.engine import Engine

    assert isinstance(engine, Engine)
    items = [BatchItem("r", "the digit 3", None, [seed], "png", None) for seed in SEEDS]
    computed = engine.compute(BatchJob(1, 32, 32, 4, 0.0, items))
    assert isinstance(computed, DeviceBatch)
    return computed.pixels


@pytest.mark.parametrize("tier", [Tier.E, Tier.XL, Tier.L, Tier.M, Tier.S])
def test_edits_and_previews_work_in_every_tier(tier: Tier, tmp_path: Path) -> None:
    engine = engine_for(tier, tmp_path)
    sources = threes(engine)
    classifier = load_classifier()
    items = [
        BatchItem("r", "the digit 8", None, [seed], "png", None, init_images=[sources[i]], partial_images=2)
        for i, seed in enumerate(SEEDS)
    ]
    taken: list[PreviewBatch] = []
    edited = engine.compute(
        BatchJob(2, 32, 32, 4, 0.0, items, Task.IMAGE_TO_IMAGE, 0.9), on_preview=taken.append
    )  # type: ignore[attr-defined]
    assert isinstance(edited, DeviceBatch)
    reads = classifier.predict_images([Image.fromarray(p) for p in edited.pixels])
    assert (reads == 8).mean() >= 0.75, (tier, reads)
    assert sorted((p.item_index, p.partial_index) for b in taken for p in b.previews) == sorted(
        (i, k) for i in range(len(SEEDS)) for k in range(2)
    )
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255
    inpaint = [
        BatchItem("r", "the digit 8", None, [seed], "png", None, init_images=[sources[i]], mask=mask)
        for i, seed in enumerate(SEEDS)
    ]
    painted = engine.compute(BatchJob(3, 32, 32, 4, 0.0, inpaint, Task.INPAINT, 1.0))  # type: ignore[attr-defined]
    assert isinstance(painted, DeviceBatch)
    assert np.array_equal(painted.pixels[:, :, 16:], sources[:, :, 16:])
    assert np.isfinite(painted.pixels.astype(float)).all()


def test_sdxl_edit_pipelines_and_previews_run() -> None:
    from diffuserve.engine.edits import edit_kwargs, edit_pipelines
    from diffuserve.engine.previews import PreviewTaker
    from diffuserve.models.random_weights import build_random_pipeline

    pipe = build_random_pipeline(
        "stabilityai/stable-diffusion-xl-base-1.0", device="cuda", dtype=torch.bfloat16
    )
    pipelines = edit_pipelines(pipe)
    assert set(pipelines) == {Task.IMAGE_TO_IMAGE, Task.INPAINT}
    source = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    mask[64:192, 64:192] = 255
    for task, item_mask in ((Task.IMAGE_TO_IMAGE, None), (Task.INPAINT, mask)):
        item = BatchItem(
            "r", "a fox", None, [1], "png", None, init_images=[source], mask=item_mask, partial_images=2
        )
        job = BatchJob(4, 256, 256, 6, 5.0, [item], task, 0.8)
        taken: list[PreviewBatch] = []
        taker = PreviewTaker(pipelines[task], job, taken.append)

        def on_step(_p: object, step: int, _t: object, tensors: dict, taker: PreviewTaker = taker) -> dict:
            taker(step, tensors["latents"])
            return tensors

        with torch.no_grad():
            images = pipelines[task](
                prompt=["a fox"], height=256, width=256, num_inference_steps=6, output_type="pt",
                generator=[torch.Generator().manual_seed(1)], callback_on_step_end=on_step, **edit_kwargs(job),
            ).images  # fmt: skip
        assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
        assert [p.partial_index for b in taken for p in b.previews] == [0, 1]
