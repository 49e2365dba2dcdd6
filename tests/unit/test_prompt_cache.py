"""The prompt-embedding cache on the digits model (CPU): a prompt seen again skips the text encoders and gives
the image it gave without the cache; the cache holds at most its bytes, oldest out first; batches with a
negative prompt, edits and models that do not encode the FLUX.1 way keep working."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from diffuserve.engine.prompt_cache import PromptCache, takes_embeddings
from diffuserve.messages import DeviceBatch
from diffuserve.models.registry import BUILTIN_MODELS
from diffuserve.types import TINY_FLUX, BatchItem, BatchJob, Task, Tier
from tests.helpers import engine_config

SIZE, STEPS, GUIDANCE = TINY_FLUX.native_size, TINY_FLUX.default_steps, TINY_FLUX.default_guidance


def started(cache_bytes: int) -> Any:
    from diffuserve.engine.engine import Engine

    engine = Engine(engine_config(tier=Tier.XL, max_batch=4, prompt_cache_bytes=cache_bytes), "cpu")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def cached(one_torch_thread: None) -> Any:
    return started(2**20)


@pytest.fixture(scope="module")
def uncached(one_torch_thread: None) -> Any:
    return started(0)


class EncoderCalls:
    """Counts the T5 encoder's forward calls (the sequence FLUX.1 attends to)."""

    def __init__(self, engine: Any) -> None:
        self.count = 0
        engine.pipeline.text_encoder_2.register_forward_hook(self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1


def pixels(engine: Any, prompts: list[str], seed: int = 5, negative: str | None = None) -> np.ndarray:
    items = [BatchItem(f"r{i}", p, negative, [seed + i], "png", None) for i, p in enumerate(prompts)]
    computed = engine.compute(BatchJob(1, SIZE, SIZE, STEPS, GUIDANCE, items))
    assert isinstance(computed, DeviceBatch), computed
    return np.asarray(computed.pixels)


def test_a_prompt_seen_again_skips_the_encoders_and_gives_the_same_image(cached: Any, uncached: Any) -> None:
    calls = EncoderCalls(cached)
    first = pixels(cached, ["the digit 4"])
    assert calls.count == 1
    again = pixels(cached, ["the digit 4"])
    assert calls.count == 1, "the second request must not run the text encoders"
    assert np.array_equal(first, again)
    # Exactly what the pipeline gives from the text itself, without the cache.
    assert np.array_equal(first, pixels(uncached, ["the digit 4"]))
    assert cached._prompt_cache.hits >= 1


def test_a_batch_encodes_only_its_new_prompts_once_each(cached: Any) -> None:
    cache = cached._prompt_cache
    calls = EncoderCalls(cached)
    pixels(cached, ["the digit 1"])
    misses = cache.misses
    pixels(cached, ["the digit 1", "the digit 2", "the digit 2", "the digit 9"])
    assert calls.count == 2, "one encoder call for the batch's two new prompts, none for the cached one"
    assert cache.misses == misses + 2


def test_the_cache_holds_at_most_its_bytes_oldest_out_first(cached: Any) -> None:
    pipeline = cached._pipelines[Task.GENERATE]
    one = PromptCache(pipeline, 1 << 30, TINY_FLUX.max_sequence_length)
    one.embeddings(["a"])
    entry_bytes = one.bytes
    small = PromptCache(pipeline, 2 * entry_bytes, TINY_FLUX.max_sequence_length)
    small.embeddings(["the digit 1", "the digit 2"])
    small.embeddings(["the digit 1"])  # now the most recent
    rows = small.embeddings(["the digit 3", "the digit 1"])
    assert len(small) == 2 and small.bytes == 2 * entry_bytes
    assert rows["prompt_embeds"].shape[0] == 2
    small.embeddings(["the digit 2"])
    assert small.misses == 4, "2 was evicted (oldest), 1 was kept (used last)"
    # An entry larger than the whole cache is served, not kept.
    tiny = PromptCache(pipeline, entry_bytes - 1, TINY_FLUX.max_sequence_length)
    assert tiny.embeddings(["the digit 5"])["prompt_embeds"].shape[0] == 1 and len(tiny) == 0


def test_negative_prompts_and_edits_still_run(cached: Any, uncached: Any) -> None:
    negative = pixels(cached, ["the digit 6"], negative="the digit 8")
    assert np.array_equal(negative, pixels(uncached, ["the digit 6"], negative="the digit 8"))
    picture = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    item = BatchItem("e", "the digit 0", None, [3], "png", None, init_images=[picture])
    job = BatchJob(2, SIZE, SIZE, STEPS, GUIDANCE, [item], task=Task.IMAGE_TO_IMAGE, strength=0.6)
    with_cache, without = cached.compute(job), uncached.compute(job)
    assert isinstance(with_cache, DeviceBatch) and isinstance(without, DeviceBatch)
    assert np.array_equal(with_cache.pixels, without.pixels)


def test_only_pipelines_that_encode_the_flux_way_take_embeddings() -> None:
    assert takes_embeddings(BUILTIN_MODELS["digits"]())
    assert takes_embeddings(BUILTIN_MODELS["tiny-flux-kontext"]())
    for other in ("tiny-sd35", "tiny-qwen-image", "tiny-flux2-klein", "tiny-z-image"):
        assert not takes_embeddings(BUILTIN_MODELS[other]()), other
