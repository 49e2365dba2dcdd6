"""Start-up on a CUDA GPU: a warm start from the compile artefacts a cold start saved gives the same image for
the same seed, and the batch sizes after the first warm up after ready, each served only once warm."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest
import torch

from diffuserve.bench.server import SpawnedServer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def start_and_generate(cache_dir: Path, log_path: Path) -> tuple[bytes, dict[str, object]]:
    """One server start on the digits model at tier L (fp8, compiled, CUDA graphs), batch 4: the image of a
    fixed seed, and the worker as readiness describes it once every batch size is warm and the compile
    artefacts are saved (stopped before, the worker would take them with it)."""
    serve = ["digits", "--tier", "L", "--model-batch", "4", "--devices", "0", "--cache-dir", str(cache_dir)]
    with SpawnedServer(log_path, serve_args=[*serve, "--no-playground"], ready_timeout=600) as server:
        body = {"prompt": "a handwritten digit 7", "seed": 1234, "response_format": "b64_json"}
        body["output_format"] = "png"
        response = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=300)
        assert response.status_code == 200, response.text
        image = base64.b64decode(response.json()["data"][0]["b64_json"])
        deadline = time.monotonic() + 300
        while True:
            worker = httpx.get(f"{server.base_url}/health/ready", timeout=5).json()["workers"][0]
            all_warm = worker["warm_batch_sizes"] == [1, 2, 3, 4]
            if (all_warm and worker.get("compile_cache")) or time.monotonic() > deadline:
                return image, worker
            time.sleep(0.2)


def test_a_warm_start_from_artefacts_gives_the_cold_starts_image(tmp_path: Path) -> None:
    cold_image, cold = start_and_generate(tmp_path / "cache", tmp_path / "cold.log")
    assert cold["warm_batch_sizes"] == [1, 2, 3, 4]
    saved = list((tmp_path / "cache" / "compile").glob("*.bin"))
    assert saved and cold.get("compile_cache") == str(saved[0]), "the cold start saved no compile artefacts"

    warm_image, warm = start_and_generate(tmp_path / "cache", tmp_path / "warm.log")
    assert warm_image == cold_image
    assert "compile cache: loaded" in (tmp_path / "warm.log").read_text()
    phases_cold, phases_warm = cold["start_seconds"], warm["start_seconds"]
    assert isinstance(phases_cold, dict) and isinstance(phases_warm, dict)
    # The artefacts spare the warm start the kernels' generation: its first size warms faster.
    assert phases_warm["warmup_b1"] < phases_cold["warmup_b1"]
