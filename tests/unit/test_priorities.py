"""Priority classes in the batcher: order, aging, class-pure batches, preemption at a step, progress."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from diffuserve.messages import BatchResult, StepProgress
from diffuserve.serving.priorities import PriorityRules
from diffuserve.serving.scheduler import Scheduler
from diffuserve.types import Priority
from tests.unit.test_scheduler import FakeWorker, request, result_for


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def prioritised(rid: str, priority: Priority, **kwargs: object):
    return replace(request(rid, **kwargs), priority=priority)  # type: ignore[arg-type]


def busy_scheduler(
    rules: PriorityRules | None = None, clock: Clock | None = None
) -> tuple[Scheduler, FakeWorker]:
    cancelled: list[tuple[int, int]] = []
    scheduler = Scheduler(
        max_batch=4,
        max_queue=100,
        batch_wait_s=0.0,
        rules=rules or PriorityRules(preempt=False),
        clock=clock or Clock(),
        on_abandoned=lambda worker, batch: cancelled.append((worker, batch)),
    )
    scheduler.cancelled_batches = cancelled  # type: ignore[attr-defined]
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    return scheduler, worker


async def test_higher_classes_go_first_and_first_come_first_within_a_class() -> None:
    scheduler, worker = busy_scheduler()
    scheduler.submit(prioritised("running", Priority.BATCH))
    scheduler.submit(prioritised("b1", Priority.BATCH, width=64))
    scheduler.submit(prioritised("d1", Priority.DEFAULT, width=96))
    scheduler.submit(prioritised("i1", Priority.INTERACTIVE, width=128))
    scheduler.submit(prioritised("i2", Priority.INTERACTIVE, width=160))
    assert [scheduler.position(p) for p in scheduler.queue] == [3, 2, 0, 1]
    order = []
    for _ in range(4):
        scheduler.batch_finished(worker, result_for(worker.jobs[-1]))
        order.append(worker.jobs[-1].items[0].request_id)
    assert order == ["i1", "i2", "d1", "b1"]


async def test_a_lower_class_never_rides_in_a_higher_class_batch() -> None:
    scheduler, worker = busy_scheduler()
    scheduler.submit(prioritised("running", Priority.BATCH))
    for i in range(3):
        scheduler.submit(prioritised(f"b{i}", Priority.BATCH))
    scheduler.submit(prioritised("i", Priority.INTERACTIVE))
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    assert [item.request_id for item in worker.jobs[1].items] == ["i"], "an interactive batch runs alone"
    scheduler.batch_finished(worker, result_for(worker.jobs[1]))
    assert [item.request_id for item in worker.jobs[2].items] == ["b0", "b1", "b2"]


async def test_an_interactive_request_is_not_held_by_the_batching_window() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=10.0, rules=PriorityRules(preempt=False))
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(prioritised("running", Priority.BATCH))
    interactive = scheduler.submit(prioritised("i", Priority.INTERACTIVE))
    assert interactive.arrived_while_busy
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    assert [item.request_id for item in worker.jobs[1].items] == ["i"], "it starts once the worker is free"
    default = scheduler.submit(prioritised("d", Priority.DEFAULT))
    scheduler.batch_finished(worker, result_for(worker.jobs[1]))
    assert len(worker.jobs) == 2 and default in scheduler.queue, "a default request still waits for company"


async def test_waiting_requests_age_into_higher_classes_so_none_starves() -> None:
    clock = Clock()
    scheduler, worker = busy_scheduler(PriorityRules(aging_s=10.0, preempt=False), clock)
    scheduler.submit(prioritised("running", Priority.INTERACTIVE))
    old_batch = scheduler.submit(prioritised("old batch", Priority.BATCH, width=64))
    clock.now = 25.0  # two classes up: as high as interactive, and first come
    scheduler.submit(prioritised("new interactive", Priority.INTERACTIVE, width=96))
    assert scheduler.position(old_batch) == 0
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    assert worker.jobs[1].items[0].request_id == "old batch"


async def test_interactive_request_preempts_early_batch_work_which_runs_again() -> None:
    scheduler, worker = busy_scheduler(PriorityRules(preempt=True))
    batch = scheduler.submit(prioritised("batch", Priority.BATCH, steps=8))
    running_id = worker.jobs[0].batch_id
    scheduler.step_progress(StepProgress(running_id, 2, 8))
    urgent = scheduler.submit(prioritised("urgent", Priority.INTERACTIVE, width=64))
    assert scheduler.cancelled_batches == [(0, running_id)]  # type: ignore[attr-defined]
    assert batch in scheduler.queue and not batch.future.done(), "the preempted request waits again"
    # The worker stops at its next step and answers with an error nobody is told of.
    scheduler.batch_finished(worker, BatchResult(batch_id=running_id, error="cancelled"))
    assert worker.jobs[1].items[0].request_id == "urgent"
    scheduler.batch_finished(worker, result_for(worker.jobs[1]))
    assert (await urgent.future).images[0].data == b"urgent"
    assert worker.jobs[2].items[0].request_id == "batch"
    # Never twice: a second interactive request waits for the batch work that was already stopped once.
    scheduler.step_progress(StepProgress(worker.jobs[2].batch_id, 1, 8))
    scheduler.submit(prioritised("urgent again", Priority.INTERACTIVE, width=96))
    assert len(scheduler.cancelled_batches) == 1  # type: ignore[attr-defined]
    scheduler.batch_finished(worker, result_for(worker.jobs[2]))
    assert (await batch.future).images[0].data == b"batch"


@pytest.mark.parametrize(
    ("step", "priority", "expected"),
    [(7, Priority.BATCH, False), (4, Priority.DEFAULT, False), (6, Priority.BATCH, True)],
)
async def test_preemption_stops_only_batch_work_with_steps_to_save(
    step: int, priority: Priority, expected: bool
) -> None:
    scheduler, worker = busy_scheduler(PriorityRules(preempt=True))
    scheduler.submit(prioritised("running", priority, steps=8))
    scheduler.step_progress(StepProgress(worker.jobs[0].batch_id, step, 8))
    scheduler.submit(prioritised("urgent", Priority.INTERACTIVE, width=64))
    assert bool(scheduler.cancelled_batches) is expected  # type: ignore[attr-defined]


async def test_a_batch_that_finishes_before_the_stop_reaches_it_still_answers() -> None:
    scheduler, worker = busy_scheduler(PriorityRules(preempt=True))
    batch = scheduler.submit(prioritised("batch", Priority.BATCH))
    first = worker.jobs[0]
    scheduler.submit(prioritised("urgent", Priority.INTERACTIVE, width=64))
    scheduler.batch_finished(worker, result_for(first))  # its images came back before the cancel landed
    assert (await batch.future).images[0].data == b"batch"
    assert batch not in scheduler.queue
    assert worker.jobs[1].items[0].request_id == "urgent"


async def test_progress_reaches_the_requests_that_asked() -> None:
    scheduler, worker = busy_scheduler()
    steps: list[tuple[int, int]] = []
    pending = scheduler.submit(request("a"), on_progress=lambda step, total: steps.append((step, total)))
    assert scheduler.progress(pending) == (0, 8)
    scheduler.step_progress(StepProgress(worker.jobs[0].batch_id, 3, 8))
    assert steps == [(3, 8)] and scheduler.progress(pending) == (3, 8)
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    await asyncio.wait_for(pending.future, 1)
    assert scheduler.progress(pending) is None


async def test_a_stopped_batch_that_answers_anyway_stops_the_rerun_nobody_needs() -> None:
    scheduler, first = busy_scheduler(PriorityRules(preempt=True))
    second = FakeWorker(1)
    batch = scheduler.submit(prioritised("batch", Priority.BATCH))
    stopped = first.jobs[0]
    scheduler.worker_idle(second)  # busy with nothing: the interactive request below finds it idle
    del scheduler.idle[1]
    urgent = scheduler.submit(prioritised("urgent", Priority.INTERACTIVE, width=64))
    assert scheduler.cancelled_batches == [(0, stopped.batch_id)]  # type: ignore[attr-defined]
    scheduler.worker_idle(second)  # takes the interactive request, then the batch work again
    scheduler.batch_finished(second, result_for(second.jobs[0]))
    rerun = second.jobs[1]
    assert rerun.items[0].request_id == "batch"
    scheduler.batch_finished(first, result_for(stopped))  # the stop came too late: its images are good
    assert (await batch.future).images[0].data == b"batch" and (await urgent.future).images
    assert (1, rerun.batch_id) in scheduler.cancelled_batches  # type: ignore[attr-defined]


async def test_batch_work_aged_into_the_interactive_class_is_not_preempted() -> None:
    clock = Clock()
    scheduler, worker = busy_scheduler(PriorityRules(aging_s=10.0, preempt=True), clock)
    scheduler.submit(prioritised("blocker", Priority.INTERACTIVE))
    scheduler.submit(prioritised("old batch", Priority.BATCH, width=64))
    clock.now = 25.0
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    assert worker.jobs[1].items[0].request_id == "old batch"
    scheduler.submit(prioritised("urgent", Priority.INTERACTIVE, width=96))
    assert scheduler.cancelled_batches == [], "it would only be dispatched first again"  # type: ignore[attr-defined]
