"""benchmarks/gpu_startup.py's checks that need no GPU: how far a start's first image is from the first start's,
and the bytecode step that makes the import phase what a deployment's image pays."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # the script imports its siblings plainly
import gpu_startup


def test_identical_images_have_no_difference() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert gpu_startup.image_difference(pixels, pixels.copy()) == {
        "max_abs": 0,
        "share_differing": 0.0,
        "psnr_db": None,
    }


def test_a_differing_image_says_by_how_much() -> None:
    first = np.zeros((4, 4, 3), dtype=np.uint8)
    other = first.copy()
    other[0, 0, 1] = 2  # one channel of one pixel of 16, off by 2
    difference = gpu_startup.image_difference(first, other)
    assert difference["max_abs"] == 2
    assert difference["share_differing"] == pytest.approx(1 / 16)
    assert difference["psnr_db"] == pytest.approx(10 * np.log10(255**2 / (4 / 48)), abs=0.01)


def test_bytecode_is_compiled_for_the_packages_found() -> None:
    compiled = gpu_startup.compile_bytecode()
    assert compiled["packages"] >= 3  # torch, diffusers and diffuserve at least, in the test environment
    assert compiled["seconds"] >= 0
    assert isinstance(compiled["unwritable"], list)
