"""The engine's edit pipelines and previews on the built-in digits model: previews at evenly spread steps,
decoded from the denoising loop's estimate of the clean image, and inpainting's kept pixels."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from diffuserve.engine.engine import Engine
from diffuserve.engine.previews import preview_steps
from diffuserve.messages import DeviceBatch, PreviewBatch
from diffuserve.serving.image_encoder import BatchEncoder
from diffuserve.types import BatchItem, BatchJob, Task
from tests.helpers import engine_config


@pytest.mark.parametrize(
    ("total", "wanted", "steps"),
    [
        (4, 2, [1, 2]),
        (4, 3, [0, 1, 2]),
        (4, 1, [1]),
        (28, 3, [6, 13, 20]),
        (2, 3, [0]),
        (1, 2, []),
        (8, 0, []),
    ],
)
def test_previews_are_spread_evenly_and_never_the_last_step(
    total: int, wanted: int, steps: list[int]
) -> None:
    assert preview_steps(total, wanted) == steps


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine(engine_config(), "cpu")
    engine.load()
    yield engine


def item(prompt: str, seeds: list[int], previews: int = 0, **edit: object) -> BatchItem:
    return BatchItem("r", prompt, None, seeds, "png", None, partial_images=previews, **edit)  # type: ignore[arg-type]


def test_the_loaded_model_has_both_edit_pipelines(engine: Engine) -> None:
    assert engine.info is not None and set(engine.info.edit_tasks) == {Task.IMAGE_TO_IMAGE, Task.INPAINT}


def test_each_item_gets_its_own_previews_and_the_final_image_is_unchanged(engine: Engine) -> None:
    job = BatchJob(1, 32, 32, 8, 0.0, [item("the digit 4", [1], previews=3), item("the digit 7", [2, 3])])
    taken: list[PreviewBatch] = []
    computed = engine.compute(job, on_preview=taken.append)
    assert isinstance(computed, DeviceBatch)
    previews = [p for batch in taken for p in batch.previews]
    assert [(p.item_index, p.partial_index, p.pixels.shape) for p in previews] == [
        (0, i, (1, 32, 32, 3)) for i in range(3)
    ]
    plain = engine.compute(job)
    assert isinstance(plain, DeviceBatch) and np.array_equal(plain.pixels, computed.pixels)
    # The clean-image estimate comes nearer the final image with each preview.
    final = computed.pixels[0].astype(int)
    errors = [np.abs(p.pixels[0].astype(int) - final).mean() for p in previews]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 20
    messages = BatchEncoder().encode_previews(taken[0])
    assert [(m.item_index, m.partial_index, len(m.images)) for m in messages] == [(0, 0, 1)]


def test_inpainting_keeps_the_unmasked_pixels_exactly(engine: Engine) -> None:
    generation = BatchJob(9, 32, 32, 4, 0.0, [item("the digit 1", [4])])
    before = engine.compute(generation)
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    job = BatchJob(
        2,
        32,
        32,
        4,
        0.0,
        [item("the digit 8", [5], previews=2, init_images=[source], mask=mask)],
        Task.INPAINT,
        1.0,
    )
    taken: list[PreviewBatch] = []
    computed = engine.compute(job, on_preview=taken.append)
    assert isinstance(computed, DeviceBatch)
    kept = mask == 0
    assert np.array_equal(computed.pixels[0][kept], source[kept])
    assert not np.array_equal(computed.pixels[0][~kept], source[~kept])
    for batch in taken:
        assert np.array_equal(batch.previews[0].pixels[0][kept], source[kept])
    # The edit pipelines share the loaded one's scheduler: an edit leaves nothing behind in it.
    after = engine.compute(generation)
    assert isinstance(before, DeviceBatch) and isinstance(after, DeviceBatch)
    assert np.array_equal(before.pixels, after.pixels)


def test_text_tokens_are_counted_with_the_models_tokenizer(engine: Engine) -> None:
    job = BatchJob(3, 32, 32, 1, 0.0, [item("the digit 8", [0]), item("a b", [1])])
    computed = engine.compute(job)
    assert isinstance(computed, DeviceBatch)
    # T5-style: one token per known word here, plus the end-of-sequence token.
    assert computed.text_tokens == [4, 3]


def test_large_previews_decode_pooled_latents_at_the_full_size() -> None:
    """From 512² on, a preview decodes the latents pooled 2×2 (a quarter of the VAE's work) and is scaled back
    to the request's size."""
    engine = Engine(engine_config(model_repo="tiny-random"), "cpu")
    engine.load()
    job = BatchJob(5, 512, 256, 3, 0.0, [item("a b", [1], previews=1)])
    assert min(job.width, job.height) < 512  # below the threshold: the plain decode
    taken: list[PreviewBatch] = []
    assert isinstance(engine.compute(job, on_preview=taken.append), DeviceBatch)
    assert taken[0].previews[0].pixels.shape == (1, 256, 512, 3)
    job = BatchJob(6, 512, 512, 3, 0.0, [item("a b", [1], previews=1)])
    taken.clear()
    computed = engine.compute(job, on_preview=taken.append)
    assert isinstance(computed, DeviceBatch)
    assert taken[0].previews[0].pixels.shape == computed.pixels.shape == (1, 512, 512, 3)
