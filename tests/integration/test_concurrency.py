"""32 concurrent requests all succeed and the server batched some of them together."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServerHandle


def _batch_histogram(server: ServerHandle) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "diffuserve_batch_size":
            return {s.name.rsplit("_", 1)[-1] + ":" + s.labels.get("le", ""): s.value for s in family.samples}
    raise AssertionError("diffuserve_batch_size missing from /metrics")


async def _fire(server: ServerHandle, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post("/v1/images/generations", json={"prompt": f"number {i % 10}", "seed": i})
                for i in range(count)
            )
        )


def test_32_concurrent_requests_succeed_and_batch(server: ServerHandle) -> None:
    before = _batch_histogram(server)
    responses = asyncio.run(_fire(server, 32))
    assert [r.status_code for r in responses] == [200] * 32
    assert all(r.headers["content-type"] == "image/webp" for r in responses)
    # Each answer carries its own request's seed: the batcher never hands one request another's image.
    assert [r.headers["x-seed"] for r in responses] == [str(i) for i in range(32)]
    assert max(int(r.headers["x-batch-size"]) for r in responses) > 1
    after = _batch_histogram(server)
    batches = after["count:"] - before["count:"]
    single = after["bucket:1.0"] - before["bucket:1.0"]
    images = after["sum:"] - before["sum:"]
    assert images >= 32
    assert batches < 32, "every request ran alone"
    assert batches - single > 0, "/metrics shows no batch larger than 1"
