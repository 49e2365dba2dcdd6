"""Batch sizes warmed after ready: a worker is ready once batch size 1 is warm, warms the others between batches,
and the scheduler never gives it a batch of a size it has not warmed (which would compile inside the request).

A real worker process runs the real worker loop around tests/fakes.py's `fake-warming` engine, whose batch sizes
each have their own code, as compiled code on a GPU does: size 1 warms before ready, every other size only once
the test lets it (a file in the cache dir), and a batch of a size not warmed says so in its images' bytes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from diffuserve.config import Settings
from diffuserve.serving.scheduler import Scheduler
from diffuserve.serving.worker_handle import WorkerState
from diffuserve.serving.worker_process import READY_GRACE_S
from diffuserve.serving.workers import WorkerPool
from tests import fakes
from tests.unit.test_worker_pool import DEVICE, request, until


@asynccontextmanager
async def warming_pool(cache_dir: Path) -> AsyncIterator[WorkerPool]:
    scheduler = Scheduler(max_batch=4, max_queue=16, batch_wait_s=0.0)
    settings = Settings(models=["fake-warming"], model_name="fake", model_batch=4, cache_dir=str(cache_dir))
    pool = WorkerPool(settings, [DEVICE], scheduler, on_fatal=print, engine_factory=fakes.FakeEngine)
    pool.start()
    try:
        yield pool
    finally:
        await pool.stop(timeout=5.0)


def let_warm(cache_dir: Path, size: int) -> None:
    (cache_dir / f"warm-{size}").touch()


async def test_ready_at_the_first_size_the_rest_warm_between_batches(tmp_path: Path) -> None:
    async with warming_pool(tmp_path) as pool:
        await until(lambda: pool.alive == 1)
        worker = pool.workers[0]
        described = worker.describe()
        # Ready with size 1 alone; it warms 4 next (the largest, then on down).
        assert described["warm_batch_sizes"] == [1]
        assert described["phase"] == "warming batch size 4"
        assert worker.state == WorkerState.IDLE and "all_warm" not in described["start_seconds"]
        assert "compile_cache" not in described, "the artefacts are saved once every size is warm"

        # A request that comes as the worker gets ready runs before any warm-up.
        first = await asyncio.wait_for(pool.scheduler.submit(request("first")).future, READY_GRACE_S)
        assert first.images[0].data == b"first|seed=7|batch=1"
        assert worker.describe()["warm_batch_sizes"] == [1]

        await asyncio.sleep(READY_GRACE_S + 0.2)  # no request for a while: the worker warms size 4
        lone = pool.scheduler.submit(request("lone"))
        await asyncio.sleep(0.3)
        # The worker is inside size 4's warm-up: the request waits for it, then runs warm code.
        assert not lone.future.done()
        let_warm(tmp_path, 4)
        done = await asyncio.wait_for(lone.future, 10)
        assert done.images[0].data == b"lone|seed=7|batch=1"

        for size in (3, 2):
            let_warm(tmp_path, size)
        await until(lambda: worker.describe()["warm_batch_sizes"] == [1, 2, 3, 4])
        described = worker.describe()
        assert "phase" not in described
        phases = described["start_seconds"]
        assert phases["all_warm"] >= phases["total"]
        assert {f"warmup_b{size}" for size in (1, 2, 3, 4)} <= set(phases)

        # Then the compile artefacts, saved after the last size, all of them in: readiness says where.
        saved = tmp_path / "compile" / "fake.bin"
        await until(lambda: "compile_cache" in worker.describe())
        described = worker.describe()
        assert described["compile_cache"] == str(saved)
        assert saved.read_bytes() == b"sizes [1, 2, 3, 4]"
        assert described["start_seconds"]["compile_cache_save"] == 0.02


async def test_a_size_not_yet_warm_waits_for_its_warm_up_and_is_never_compiled_in_a_request(
    tmp_path: Path,
) -> None:
    async with warming_pool(tmp_path) as pool:
        await until(lambda: pool.alive == 1)
        worker = pool.workers[0]
        let_warm(tmp_path, 4)
        let_warm(tmp_path, 3)
        await until(lambda: worker.describe()["warm_batch_sizes"] == [1, 3, 4])
        # The worker is inside size 2's warm-up now: a request of 2 images is held back, not sent to compile.
        pair = pool.scheduler.submit(request("pair", n=2))
        await asyncio.sleep(0.3)
        assert pair in pool.scheduler.queue and not pool.scheduler.in_flight
        assert pool.scheduler.idle  # the worker is free as far as batches go: the size alone holds it back

        started = time.monotonic()
        let_warm(tmp_path, 2)
        done = await asyncio.wait_for(pair.future, 10)
        assert [image.data for image in done.images] == [b"pair|seed=7|batch=2", b"pair|seed=8|batch=2"]
        assert done.batch_size == 2 and time.monotonic() - started < 5

        # Every size warm: the queue batches as usual, up to the model's batch.
        waiting = [pool.scheduler.submit(request(f"r{i}", seed=10 * i)) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*(p.future for p in waiting)), 10)
        assert all(b"compiled-in-request" not in r.images[0].data for r in results)
