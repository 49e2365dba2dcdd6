"""WorkerPool with stand-in engine workers (real processes): replacement, back-off and fatal start-up paths."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from diffuserve.config import Settings
from diffuserve.errors import WorkerCrashed
from diffuserve.serving.scheduler import Scheduler
from diffuserve.serving.worker_handle import WorkerState
from diffuserve.serving.workers import WorkerPool
from diffuserve.types import GenerationRequest
from tests import fakes

# Not "cpu": the pool gives CPU workers torch thread settings, which a stand-in without torch has no use for.
DEVICE = "fake:0"


class Events:
    """What the pool reports through its callbacks, with the time of each."""

    def __init__(self) -> None:
        self.fatal: list[str] = []
        self.restarts: list[float] = []
        self.spawns: list[float] = []


@asynccontextmanager
async def running_pool(repo: str = "fake") -> AsyncIterator[tuple[WorkerPool, Events]]:
    """A pool of one real worker process running the real worker loop around a FakeEngine (`repo` picks how
    it starts: see tests/fakes.py)."""
    events = Events()
    scheduler = Scheduler(max_batch=2, max_queue=8, batch_wait_s=0.0)
    pool = WorkerPool(
        Settings(models=[repo], model_name="fake", model_batch=2),
        [DEVICE],
        scheduler,
        on_fatal=events.fatal.append,
        on_restart=lambda: events.restarts.append(time.monotonic()),
        engine_factory=fakes.FakeEngine,
    )
    spawn = pool._spawn

    def timed_spawn(worker_id: int, device: str, failures_in_a_row: int) -> None:
        events.spawns.append(time.monotonic())
        spawn(worker_id, device, failures_in_a_row)

    pool._spawn = timed_spawn  # type: ignore[method-assign]
    pool.start()
    try:
        yield pool, events
    finally:
        await pool.stop(timeout=5.0)


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def request(prompt: str, n: int = 1, seed: int = 7) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"req-{prompt}", model="fake", prompt=prompt, n=n, width=32, height=32, steps=4, guidance=0.0,
        seed=seed,
    )  # fmt: skip


async def test_a_batch_round_trip() -> None:
    async with running_pool() as (pool, _):
        await until(lambda: pool.alive == 1)
        assert pool.model is not None and pool.model.name == "fake"
        for seed in (10, 20):  # a second batch: the worker went back to idle after the first
            done = await asyncio.wait_for(pool.scheduler.submit(request("a cat", n=2, seed=seed)).future, 10)
            assert [image.seed for image in done.images] == [seed, seed + 1]
            assert done.images[0].data == f"a cat|seed={seed}|batch=2".encode()
        assert pool.workers[0].state == WorkerState.IDLE


async def test_a_worker_that_dies_after_ready_fails_its_batch_and_is_replaced(tmp_path: Path) -> None:
    async with running_pool() as (pool, events):
        await until(lambda: pool.alive == 1)
        first = pool.workers[0]
        assert first.pid is not None
        held = pool.scheduler.submit(request(f"hold:{tmp_path / 'never'}"))
        await until(lambda: first.state == WorkerState.BUSY)

        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            await asyncio.wait_for(held.future, 5)  # failed at once, not at a deadline
        await until(lambda: pool.alive == 1 and pool.workers[0] is not first)

        replacement = pool.workers[0]
        assert (
            replacement.failures_in_a_row == 1
            and replacement.replacements == 1
            and replacement.pid != first.pid
        )
        assert len(events.restarts) == 1 and not events.fatal
        assert not first.process.is_alive()
        done = await asyncio.wait_for(pool.scheduler.submit(request("after")).future, 10)
        assert done.worker_id == 0 and done.images[0].seed == 7


async def test_restart_back_off_grows_while_a_worker_keeps_dying() -> None:
    async with running_pool("fake-flapping") as (pool, events):
        await until(lambda: len(events.spawns) == 3)
        # Each replacement waits longer than the last: 0.5 s, then 1 s (0.5 × 2^failures in a row).
        gaps = [spawn - died for died, spawn in zip(events.restarts, events.spawns[1:], strict=False)]
        assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps
        assert gaps[1] > gaps[0] + 0.4, gaps
        assert [w.failures_in_a_row for w in pool.workers.values()] == [2]
        assert not events.fatal  # it was ready once: the model loads, so the pool keeps trying


async def test_a_worker_that_reports_a_load_failure_makes_the_pool_fatal_at_once() -> None:
    async with running_pool("fake-failing") as (pool, events):
        await until(lambda: events.fatal)
        assert "could not load the model" in events.fatal[0]
        assert "OSError: no model at /nowhere" in events.fatal[0]
        await asyncio.sleep(0.6)  # past the first back-off: no replacement was scheduled
        assert len(events.spawns) == 1 and not events.restarts
        assert pool.alive == 0 and pool.model is None


async def test_a_worker_that_never_gets_ready_makes_the_pool_fatal_after_its_attempts() -> None:
    async with running_pool("fake-crashing") as (pool, events):
        await until(lambda: events.fatal)
        assert len(events.spawns) == 3  # MAX_START_ATTEMPTS
        assert "exited with code 3" in events.fatal[0]
        assert pool.alive == 0 and pool.model is None
