"""The pipelined worker through the real server: the time split in the headers and metrics, and every output
format giving the same image alone or in a batch."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np

from tests.helpers import ServerHandle, decode_image

PHASES = ["queue", "denoise", "decode", "encode", "transfer", "respond", "total"]


def timing(header: str) -> dict[str, float]:
    parts = [p.strip().partition(";dur=") for p in header.split(",")]
    return {name: float(dur) for name, _, dur in parts}


def test_server_timing_splits_the_request_into_its_phases(server: ServerHandle) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"prompt": "the digit 4", "seed": 3, "output_format": "png"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    phases = timing(response.headers["server-timing"])
    assert list(phases) == PHASES
    assert all(value >= 0 for value in phases.values())
    assert phases["denoise"] > 0 and phases["encode"] > 0
    inference = float(response.headers["x-inference-ms"])
    assert abs(inference - (phases["denoise"] + phases["decode"])) <= 0.2  # headers round to 0.1 ms
    assert float(response.headers["x-encode-ms"]) == phases["encode"]
    # The parts never add up to more than the whole the server measured.
    assert sum(v for k, v in phases.items() if k != "total") <= phases["total"] + 0.5
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for phase in PHASES[:-1]:
        assert f'diffuserve_phase_seconds_count{{phase="{phase}"}}' in metrics


def test_every_format_gives_the_same_image_alone_and_in_a_batch(server: ServerHandle) -> None:
    url = f"{server.base_url}/v1/images/generations"
    bodies = [
        {"prompt": f"the digit {d}", "seed": 40 + d, "output_format": fmt, "response_format": "b64_json"}
        for d, fmt in ((1, "png"), (2, "webp"), (3, "jpeg"))
    ]

    async def batched() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            # A request of another size holds the worker, so the three queue and share one batch.
            blocker = asyncio.create_task(
                client.post(url, json={"prompt": "x", "size": "256x256", "num_inference_steps": 60})
            )
            await asyncio.sleep(0.3)
            results = await asyncio.gather(*(client.post(url, json=body) for body in bodies))
            assert (await blocker).status_code == 200
            return list(results)

    together = asyncio.run(batched())
    assert [r.headers["x-batch-size"] for r in together] == ["3"] * 3
    for body, response in zip(bodies, together, strict=True):
        alone = httpx.post(url, json=body, timeout=60)
        assert alone.headers["x-batch-size"] == "1"
        a, b = (
            np.asarray(decode_image(base64.b64decode(r.json()["data"][0]["b64_json"])), dtype=np.int16)
            for r in (alone, response)
        )
        # Batched matmuls may round a last bit differently (see test_determinism); lossy formats re-encode
        # those few pixels, so their tolerance is JPEG/WebP's, on average still well under one level.
        assert np.abs(a - b).mean() <= (0.05 if body["output_format"] == "png" else 1.0), body
