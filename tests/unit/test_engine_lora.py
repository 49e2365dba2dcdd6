"""The engine's per-row adapters on the digits model (CPU): the image diffusers' own LoRA loading gives, every
row of a mixed batch with its own adapters, and a file that changed after the server checked it failing its
batch with one message naming the adapter, while the batches after it run as before."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffuserve.engine.lora.random_adapters import save_random_adapter
from diffuserve.messages import BatchResult, DeviceBatch
from diffuserve.models.digits.lora_train import MIRROR_WEIGHTS
from diffuserve.models.registry import BUILTIN_MODELS
from diffuserve.types import TINY_FLUX, BatchItem, BatchJob, LoraUse, Tier
from tests.helpers import engine_config

SIZE, STEPS, GUIDANCE = TINY_FLUX.native_size, TINY_FLUX.default_steps, TINY_FLUX.default_guidance
PROMPT = "the digit 3"


def started(tier: Tier) -> Any:
    from diffuserve.engine.engine import Engine

    engine = Engine(engine_config(tier=tier, lora_max_rank=8, max_batch=4), "cpu")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def eager(one_torch_thread: None) -> Any:
    return started(Tier.E)


@pytest.fixture(scope="module")
def fused(one_torch_thread: None) -> Any:
    """Tier XL: fused QKV projections (the adapters' separate q, k, v become parts of one layer)."""
    return started(Tier.XL)


def pixels(engine: Any, *rows: tuple[int, tuple[LoraUse, ...]]) -> np.ndarray:
    items = [
        BatchItem(f"r{i}", PROMPT, None, [seed], "png", None, loras=loras)
        for i, (seed, loras) in enumerate(rows)
    ]
    computed = engine.compute(BatchJob(1, SIZE, SIZE, STEPS, GUIDANCE, items))
    assert isinstance(computed, DeviceBatch), computed
    return computed.pixels.astype(int)


def diffusers_image(seed: int, weights: Path | None) -> np.ndarray:
    """The reference: the plain pipeline, the adapter loaded by diffusers (PEFT layers), one generator."""
    pipe = BUILTIN_MODELS["digits"]()
    pipe.set_progress_bar_config(disable=True)
    if weights is not None:
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
    image = pipe(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=TINY_FLUX.max_sequence_length,
        output_type="np",
    ).images[0]
    return np.asarray((image * 255).round(), dtype=int)


def test_an_adapter_in_a_slot_gives_diffusers_own_image(eager: Any) -> None:
    mirror = LoraUse("mirror", str(MIRROR_WEIGHTS))
    ours = pixels(eager, (7, (mirror,)), (7, ()))
    assert np.abs(ours[0] - diffusers_image(7, MIRROR_WEIGHTS)).max() <= 1
    assert np.abs(ours[1] - diffusers_image(7, None)).max() <= 1
    assert np.abs(ours[0] - ours[1]).mean() > 5, "the adapter changed nothing"


def test_rows_of_a_mixed_batch_keep_their_own_adapters_fused_or_not(
    eager: Any, fused: Any, tmp_path: Path
) -> None:
    ink = LoraUse(
        "ink",
        str(save_random_adapter(tmp_path / "ink.safetensors", eager.info.lora_targets, rank=4, std=0.2)),
    )
    mirror = LoraUse("mirror", str(MIRROR_WEIGHTS), 0.7)
    rows = [(11, (mirror,)), (12, ()), (13, (ink,)), (14, (ink, mirror))]
    for engine in (eager, fused):
        together = pixels(engine, *rows)
        for index, row in enumerate(rows):
            assert np.abs(together[index] - pixels(engine, row)[0]).max() <= 2, (engine.config.tier, index)
    assert np.abs(pixels(eager, *rows) - pixels(fused, *rows)).max() <= 2


def test_a_file_changed_after_the_check_fails_its_batch_in_one_message(eager: Any, tmp_path: Path) -> None:
    path = tmp_path / "late.safetensors"
    targets = eager.info.lora_targets
    save_random_adapter(path, targets, rank=4, seed=1, std=0.2)
    late = LoraUse("late", str(path))
    before = pixels(eager, (5, (late,)))
    save_random_adapter(path, targets, rank=16, seed=2)  # above LORA_MAX_RANK now
    failed = eager.compute(
        BatchJob(
            2, SIZE, SIZE, STEPS, GUIDANCE, [BatchItem("x", PROMPT, None, [5], "png", None, loras=(late,))]
        )
    )
    assert isinstance(failed, BatchResult)
    assert (
        failed.error is not None
        and "adapter 'late' cannot be read now" in failed.error
        and str(path) not in failed.error
    )
    path.unlink()
    failed = eager.compute(
        BatchJob(
            3, SIZE, SIZE, STEPS, GUIDANCE, [BatchItem("x", PROMPT, None, [5], "png", None, loras=(late,))]
        )
    )
    assert isinstance(failed, BatchResult) and "No such file" in str(failed.error)
    assert not eager.broken
    save_random_adapter(path, targets, rank=4, seed=1, std=0.2)
    shutil.copystat(MIRROR_WEIGHTS, path)  # another version of the file: read again
    assert np.array_equal(pixels(eager, (5, (late,))), before), "the slots hold what they held before"


def test_an_adapter_named_at_start_for_another_model_is_not_read_ahead(eager: Any, tmp_path: Path) -> None:
    other = save_random_adapter(tmp_path / "other.safetensors", {"blocks.0.mlp": (5, 7)}, rank=4)
    eager.adapters.preload((str(other), str(MIRROR_WEIGHTS)))  # no error: the engine stays loadable
    paths = [key[0] for key in eager.adapters.cache._held]
    assert str(MIRROR_WEIGHTS) in paths and str(other) not in paths
