"""benchmarks/gpu_startup.py's checks that need no GPU: how far a start's first image is from the first start's,
and the bytecode step that makes the import phase what a deployment's image pays."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.helpers import bench_script


@pytest.fixture
def gpu_startup(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    with bench_script(monkeypatch, "gpu_startup") as module:
        yield module


def test_identical_images_have_no_difference(gpu_startup: ModuleType) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert gpu_startup.image_difference(pixels, pixels.copy()) == {
        "max_abs": 0,
        "share_differing": 0.0,
        "psnr_db": None,
    }


def test_a_differing_image_says_by_how_much(gpu_startup: ModuleType) -> None:
    first = np.zeros((4, 4, 3), dtype=np.uint8)
    other = first.copy()
    other[0, 0, 1] = 2  # one channel of one pixel of 16, off by 2
    difference = gpu_startup.image_difference(first, other)
    assert difference["max_abs"] == 2
    assert difference["share_differing"] == pytest.approx(1 / 16)
    assert difference["psnr_db"] == pytest.approx(10 * np.log10(255**2 / (4 / 48)), abs=0.01)


def test_bytecode_is_compiled_for_the_packages_found(gpu_startup: ModuleType) -> None:
    compiled = gpu_startup.compile_bytecode()
    assert compiled["packages"] >= 3  # torch, diffusers and diffuserve at least, in the test environment
    assert compiled["seconds"] >= 0
    assert isinstance(compiled["unwritable"], list)


def test_the_load_column_says_what_was_read_beside_the_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))
    imported_before = set(sys.modules)
    tables = importlib.import_module("tables")
    try:
        phases = {"spawn": 0.5, "import": 14.0, "load": 2.0, "tier": 0.9, "warmup_b1": 5.0}
        run = {"run": "warm", "ready_s": 22.0, "first_image_s": 22.6, "all_warm_s": 30.0}
        model = {
            "repo": "black-forest-labs/FLUX.1-schnell",
            "folder": {"bytes": 30e9},
            "runs": [
                {**run, "workers": [{"start_seconds": phases}]},
                {**run, "workers": [{"start_seconds": {**phases, "early_read": 3.5}}]},
            ],
        }
        environment = {
            "gpu": "H100",
            "torch": "2.11",
            "diffusers": "0.42",
            "python": "3.12",
            "date": "d",
            "commit": "c",
        }
        rendered = tables._startup_model(model, {"tier": "L", "batch": 4}, environment)
    finally:
        for name in ("tables", "common"):
            if name not in imported_before:
                sys.modules.pop(name, None)
    rows = [line for line in rendered.splitlines() if line.startswith("| warm")]
    # The whole folder over the load's seconds only where the load read all of it.
    assert "| 2.0 (15.0 GB/s) |" in rows[0]
    assert "| 2.0 (+ 3.5 s read beside the imports) |" in rows[1] and "GB/s" not in rows[1]
