"""benchmarks/gpu_repeatability.py's comparison of two starts: the first step where each kept tensor differs,
the largest difference, and the images' distance."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest
import torch

from tests.helpers import bench_script


@pytest.fixture
def repeatability(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    with bench_script(monkeypatch, "gpu_repeatability") as module:
        yield module


def start(outputs: list[float], pixel: int) -> dict[str, object]:
    steps = [
        {
            "hidden_states": torch.zeros(2, 3),
            "timestep": torch.tensor([float(i)]),
            "output": torch.full((2, 3), v),
        }
        for i, v in enumerate(outputs)
    ]
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[0, 0, 0] = pixel
    return {"steps": steps, "images": [image, image.copy()]}


def test_the_first_differing_step_and_the_largest_difference_per_tensor(repeatability: ModuleType) -> None:
    compared = repeatability.compare(start([1.0, 2.0, 3.0], 0), start([1.0, 2.5, 2.0], 6))
    assert compared["steps_compared"] == 3
    assert compared["tensors"]["hidden_states"] == {"first_step_differing": None, "largest": 0.0}
    assert compared["tensors"]["output"] == {"first_step_differing": 1, "largest": 1.0}
    # Tensors a family's denoiser does not take are left out, not reported as equal.
    assert "guidance" not in compared["tensors"]
    mse = 36 / (4 * 4 * 3)
    psnr = round(10 * math.log10(255**2 / mse), 2)
    assert compared["image"] == {"max_abs": 6, "share_differing": round(1 / 16, 6), "psnr_db": psnr}


def test_identical_starts_have_no_differing_step_and_no_psnr(repeatability: ModuleType) -> None:
    compared = repeatability.compare(start([1.0, 2.0], 3), start([1.0, 2.0], 3))
    assert all(t["first_step_differing"] is None for t in compared["tensors"].values())
    assert compared["image"] == {"max_abs": 0, "share_differing": 0.0, "psnr_db": None}


def test_tensors_of_different_shapes_differ_without_limit(repeatability: ModuleType) -> None:
    assert repeatability.difference(torch.zeros(2), torch.zeros(3)) == math.inf
