"""The watchdog's limits: from a worker's measured speed and a batch's work, never under the floor."""

from __future__ import annotations

import pytest

from diffuserve.serving.watchdog import BatchLimits, work_of
from diffuserve.types import BatchItem, BatchJob


def job(width: int = 64, steps: int = 4, images: int = 1) -> BatchJob:
    return BatchJob(
        1, width, width, steps, 0.0, [BatchItem("r", "p", None, list(range(images)), "png", None)]
    )


def test_limit_is_the_floor_until_a_batch_was_measured() -> None:
    limits = BatchLimits(factor=10, min_s=5)
    assert limits.expected_s(job()) is None
    assert limits.limit_s(job()) == 5


def test_limit_scales_with_pixels_steps_and_images() -> None:
    limits = BatchLimits(factor=10, min_s=0.001)
    limits.record(job(width=64, steps=4, images=1), 2.0)
    assert work_of(job(width=128, steps=8, images=2)) == 16 * work_of(job())
    assert limits.expected_s(job(width=128, steps=8, images=2)) == pytest.approx(32.0)
    assert limits.limit_s(job(width=128, steps=8, images=2)) == pytest.approx(320.0)


def test_speed_is_a_moving_average_and_the_floor_still_holds() -> None:
    limits = BatchLimits(factor=2, min_s=1.0)
    limits.record(job(), 1.0)
    limits.record(job(), 2.0)
    assert limits.expected_s(job()) == pytest.approx(1.2)
    limits.record(job(), 0.0)  # a nonsense measurement is ignored
    assert limits.expected_s(job()) == pytest.approx(1.2)
    tiny = BatchLimits(factor=2, min_s=30.0)
    tiny.record(job(), 0.01)
    assert tiny.limit_s(job()) == 30.0
