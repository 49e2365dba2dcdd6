"""Worker groups with stand-in ranks (real processes): one slot per group, jobs to every rank, a dead rank
takes its whole group down at once and a new group replaces it; DEVICES cut into groups."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from diffuserve.config import Settings
from diffuserve.errors import WorkerCrashed
from diffuserve.messages import BatchResult, GroupRank, WorkerFailed
from diffuserve.serving.scheduler import Scheduler
from diffuserve.serving.worker_group import free_port, plan_groups
from diffuserve.serving.worker_handle import WorkerState
from diffuserve.serving.worker_process import follow_batches, serve_batches
from diffuserve.serving.workers import WorkerPool
from diffuserve.types import BatchItem, BatchJob, GenerationRequest
from tests import fakes
from tests.unit.test_worker_pool import Events, until

DEVICES = ["fake:0", "fake:1", "fake:2", "fake:3"]


@asynccontextmanager
async def running_groups(
    repo: str = "fake", devices: list[str] = DEVICES, **settings: object
) -> AsyncIterator[tuple[WorkerPool, Events]]:
    """Groups of two real rank processes running the real worker loop around a FakeEngine."""
    events = Events()
    pool = WorkerPool(
        Settings(models=[repo], model_name="fake", model_batch=2, parallel=2, **settings),  # type: ignore[arg-type]
        devices,
        Scheduler(max_batch=2, max_queue=8, batch_wait_s=0.0),
        on_fatal=events.fatal.append,
        on_restart=lambda: events.restarts.append(time.monotonic()),
        engine_factory=fakes.FakeEngine,
    )
    pool.start()
    try:
        yield pool, events
    finally:
        await pool.stop(timeout=5.0)


def request(prompt: str, seed: int = 7) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"req-{prompt}", model="fake", prompt=prompt, n=1, width=32, height=32, steps=4, guidance=0.0,
        seed=seed,
    )  # fmt: skip


def test_devices_are_cut_into_consecutive_groups() -> None:
    assert plan_groups(["cuda:0", "cuda:1", "cuda:2", "cuda:3"], 2) == [
        ("cuda:0", "cuda:1"),
        ("cuda:2", "cuda:3"),
    ]
    assert plan_groups(["cuda:0", "cuda:1"], 1) == [("cuda:0",), ("cuda:1",)]
    assert plan_groups(["cpu", "cpu"], 2) == [("cpu", "cpu")]


@pytest.mark.parametrize(
    ("devices", "parallel", "message"),
    [
        (["cuda:0", "cuda:1", "cuda:2"], 2, "PARALLEL=2 needs a multiple of 2 devices, but DEVICES gives 3"),
        (["cpu"], 2, "PARALLEL=2 needs a multiple of 2 devices"),
        (["cuda:0", "cpu"], 2, "mixes CPU and GPU"),
        (["cuda:0", "cuda:0"], 2, "names one GPU twice"),
    ],
)
def test_devices_that_do_not_make_groups_are_refused(devices: list[str], parallel: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_groups(devices, parallel)


def test_group_rank_and_port() -> None:
    rank = GroupRank(rank=1, devices=("cuda:2", "cuda:3"), port=free_port(), timeout_s=60.0)
    assert rank.world_size == 2 and not rank.leader and 0 < rank.port < 65536


async def test_each_group_is_one_slot_and_serves() -> None:
    async with running_groups() as (pool, _):
        await until(lambda: pool.alive == 2)
        described = pool.describe()
        assert [w["devices"] for w in described] == [["fake:0", "fake:1"], ["fake:2", "fake:3"]]
        assert all(len(set(w["pids"])) == 2 and w["pid"] == w["pids"][0] for w in described)
        assert set(pool.scheduler.idle) == {0, 1}
        done = await asyncio.wait_for(pool.scheduler.submit(request("a cat")).future, 10)
        assert done.images[0].data == b"a cat|seed=7|batch=1"


async def test_a_dead_follower_fails_the_batch_at_once_and_its_group_is_replaced() -> None:
    async with running_groups() as (pool, events):
        await until(lambda: pool.alive == 2)
        pool.scheduler.idle.pop(1)  # the batch goes to group 0
        first = pool.workers[0]
        old_processes = list(first.process.processes)
        held = pool.scheduler.submit(request("die:1"))
        started = time.monotonic()
        with pytest.raises(WorkerCrashed, match="rank 1 of the group"):
            # The leader is stuck (as in a collective): only the group's teardown can answer this quickly.
            await asyncio.wait_for(held.future, 5)
        assert time.monotonic() - started < 5
        assert not any(p.is_alive() for p in old_processes), "a rank outlived its group"
        await until(lambda: pool.workers[0] is not first and pool.workers[0].state == WorkerState.IDLE)
        replacement = pool.workers[0]
        assert (
            replacement.failures_in_a_row == 1
            and replacement.replacements == 1
            and len(events.restarts) == 1
            and not events.fatal
        )
        assert not set(replacement.process.pids) & {p.pid for p in old_processes}
        assert (
            pool.workers[1] is not None and pool.workers[1].state == WorkerState.IDLE
        )  # the other group stays
        done = await asyncio.wait_for(pool.scheduler.submit(request("after")).future, 10)
        assert done.images[0].data == b"after|seed=7|batch=1"


async def test_a_rank_that_cannot_load_stops_the_server_with_its_reason() -> None:
    async with running_groups("fake-group-failing") as (pool, events):
        await until(lambda: events.fatal)
        assert re.search(
            r"could not load the model fake: rank 1: RuntimeError: no room on fake:[13]", events.fatal[0]
        )
        await until(lambda: not any(w.process.is_alive() for w in pool.workers.values()))
        assert pool.alive == 0 and not events.restarts


async def test_a_group_whose_rendezvous_failed_is_started_again(tmp_path: Path) -> None:
    """A port taken between the server's pick and rank 0's bind is not the model's fault: the group starts
    again and serves, with no fatal error."""
    async with running_groups("fake-rendezvous-race", DEVICES[:2], cache_dir=str(tmp_path)) as (pool, events):
        await until(
            lambda: pool.workers[0].state == WorkerState.IDLE and pool.workers[0].failures_in_a_row == 1
        )
        assert not events.fatal and len(events.restarts) == 1
        done = await asyncio.wait_for(pool.scheduler.submit(request("again")).future, 10)
        assert done.images[0].data == b"again|seed=7|batch=1"


class FailingEngine:
    """compute() as the real engine answers a batch that failed on the device."""

    broken = True

    def compute(
        self, job: BatchJob, cancelled: object = None, on_preview: object = None, on_step: object = None
    ) -> BatchResult:
        assert cancelled is None, "a group's ranks must never stop a batch on their own"
        return BatchResult(batch_id=job.batch_id, error="RuntimeError: boom")


@pytest.mark.parametrize("index", [0, 1], ids=["leader", "follower"])
def test_a_rank_whose_batch_fails_says_why_and_leaves(index: int) -> None:
    # The group is replaced: the leader sends no result (which would free the group for another batch).
    rank = GroupRank(rank=index, devices=("fake:0", "fake:1"), port=1, timeout_s=1.0)
    ours, theirs = multiprocessing.Pipe(duplex=True)
    ours.send(BatchJob(5, 32, 32, 4, 0.0, [BatchItem("r", "p", None, [1], "png", None)]))
    if rank.leader:
        serve_batches(FailingEngine(), theirs, 3, rank)
    else:
        follow_batches(FailingEngine(), theirs, 3, rank)
    message = ours.recv()
    assert isinstance(message, WorkerFailed) and not message.fatal
    assert message.worker_id == 3 and message.error == f"rank {index}: RuntimeError: boom"
    assert not ours.poll(0.2)
