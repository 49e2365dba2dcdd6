"""The batcher in pure asyncio with fake workers: immediacy, compatibility, bounds, cancellation, deaths."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from diffuserve.errors import GenerationFailed, QueueFull, WorkerCrashed
from diffuserve.messages import BatchResult
from diffuserve.serving.scheduler import Scheduler
from diffuserve.types import BatchJob, EncodedImage, GenerationRequest


@dataclass
class FakeWorker:
    worker_id: int
    jobs: list[BatchJob] = field(default_factory=list)

    def send(self, job: BatchJob) -> None:
        self.jobs.append(job)


def request(
    rid: str, *, n: int = 1, width: int = 32, steps: int = 8, seed: int = 0, prompt: str | None = None
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        model="m",
        prompt=prompt or rid,
        n=n,
        width=width,
        height=32,
        steps=steps,
        guidance=0.0,
        seed=seed,
    )


def result_for(job: BatchJob, *, drop: str | None = None) -> BatchResult:
    """What a worker would answer: per item, in order, one image per seed carrying the item's prompt."""
    images = [
        []
        if item.request_id == drop
        else [EncodedImage(item.prompt.encode(), seed, "image/webp") for seed in item.seeds]
        for item in job.items
    ]
    return BatchResult(batch_id=job.batch_id, images=images, inference_ms=5.0)


async def test_lone_request_starts_at_once_on_idle_worker() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=10.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    pending = scheduler.submit(request("a"))
    assert len(worker.jobs) == 1, "a lone request must not wait for the batch window"
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    done = await pending.future
    assert done.batch_size == 1
    assert [i.seed for i in done.images] == [0]


async def test_requests_queued_while_busy_are_batched_by_compatibility() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    first = scheduler.submit(request("first"))
    same = [scheduler.submit(request(f"s{i}")) for i in range(3)]
    other_size = scheduler.submit(request("wide", width=64))
    other_steps = scheduler.submit(request("long", steps=20))
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    second_job = worker.jobs[1]
    assert [item.request_id for item in second_job.items] == ["s0", "s1", "s2"]
    scheduler.batch_finished(worker, result_for(second_job))
    assert [item.request_id for item in worker.jobs[2].items] == ["wide"]
    scheduler.batch_finished(worker, result_for(worker.jobs[2]))
    assert [item.request_id for item in worker.jobs[3].items] == ["long"]
    scheduler.batch_finished(worker, result_for(worker.jobs[3]))
    for pending in [first, *same, other_size, other_steps]:
        assert (await pending.future).images
    assert (await same[0].future).batch_size == 3


async def test_batch_never_exceeds_max_images_and_n_counts() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(request("busy"))
    scheduler.submit(request("three", n=3))
    scheduler.submit(request("two", n=2))
    scheduler.submit(request("one"))
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    job = worker.jobs[1]
    assert job.num_images == 4
    assert [item.request_id for item in job.items] == ["three", "one"]
    assert job.items[0].seeds == [0, 1, 2]


async def test_window_waits_only_for_requests_that_queued_while_busy() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.05)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(request("a"))
    queued = scheduler.submit(request("b"))
    assert queued.arrived_while_busy
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    assert len(worker.jobs) == 1, "b arrived while busy and may wait for company"
    scheduler.submit(request("c"))
    await asyncio.sleep(0.1)
    assert [item.request_id for item in worker.jobs[1].items] == ["b", "c"]


async def test_queue_bound_raises_queue_full_with_retry_after() -> None:
    scheduler = Scheduler(max_batch=1, max_queue=2, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(request("running"))
    scheduler.submit(request("q1"))
    scheduler.submit(request("q2"))
    with pytest.raises(QueueFull) as excinfo:
        scheduler.submit(request("q3"))
    assert excinfo.value.retry_after >= 1


async def test_cancelled_request_is_dropped_before_running() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(request("running"))
    gone = scheduler.submit(request("gone"))
    stays = scheduler.submit(request("stays"))
    scheduler.cancel(gone)
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    assert [item.request_id for item in worker.jobs[1].items] == ["stays"]
    assert gone.future.cancelled()
    scheduler.batch_finished(worker, result_for(worker.jobs[1]))
    assert (await stays.future).images


async def test_worker_death_fails_only_its_batch() -> None:
    scheduler = Scheduler(max_batch=1, max_queue=10, batch_wait_s=0.0)
    dying, healthy = FakeWorker(0), FakeWorker(1)
    scheduler.worker_idle(dying)
    lost = scheduler.submit(request("lost"))
    waiting = scheduler.submit(request("waiting"))
    scheduler.worker_gone(0, "killed")
    with pytest.raises(WorkerCrashed):
        await lost.future
    assert not waiting.future.done()
    scheduler.worker_idle(healthy)
    scheduler.batch_finished(healthy, result_for(healthy.jobs[0]))
    assert (await waiting.future).worker_id == 1


async def test_missing_outputs_fail_the_request_not_the_batch() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(request("busy"))
    ok = scheduler.submit(request("ok"))
    short = scheduler.submit(request("short"))
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    scheduler.batch_finished(worker, result_for(worker.jobs[1], drop="short"))
    assert (await ok.future).images
    with pytest.raises(GenerationFailed):
        await short.future


async def test_engine_error_fails_every_request_of_the_batch() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    pending = scheduler.submit(request("a"))
    scheduler.batch_finished(worker, BatchResult(batch_id=worker.jobs[0].batch_id, error="boom"))
    with pytest.raises(GenerationFailed, match="boom"):
        await pending.future
    assert 0 in scheduler.idle, "the worker is idle again after a failed batch"


async def test_observer_sees_batch_sizes_and_depth() -> None:
    seen: dict[str, list] = {"sizes": [], "depths": []}

    class Observer:
        def queue_depth(self, depth: int, by_priority: dict) -> None:
            seen["depths"].append(depth)
            assert sum(by_priority.values()) == depth

        def batch_started(self, images: int, waits_s: list[float], priorities: list) -> None:
            seen["sizes"].append(images)
            assert len(priorities) == len(waits_s)

        def preempted(self, requests: int) -> None:
            pass

        def adapters_used(self, loaded: dict[str, float], hits: list[str]) -> None:
            pass

        def prompts_encoded(self, hits: int, misses: int) -> None:
            pass

    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0, observer=Observer())
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(request("a"))
    scheduler.submit(request("b"))
    scheduler.submit(request("c"))
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    assert seen["sizes"] == [1, 2]
    assert max(seen["depths"]) == 2 and seen["depths"][-1] == 0


async def test_results_are_matched_by_position_even_with_repeated_request_ids() -> None:
    """Request ids come from clients (X-Request-Id) and may repeat: they must never route images."""
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(request("busy"))
    one = scheduler.submit(request("same", prompt="digit 1", seed=1))
    eight = scheduler.submit(request("same", prompt="digit 8", seed=2))
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    scheduler.batch_finished(worker, result_for(worker.jobs[1]))
    first, second = await one.future, await eight.future
    assert [(i.data, i.seed) for i in first.images] == [(b"digit 1", 1)]
    assert [(i.data, i.seed) for i in second.images] == [(b"digit 8", 2)]


async def test_requests_above_the_batch_limit_are_refused() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    with pytest.raises(ValueError, match="batch limit"):
        scheduler.submit(request("big", n=5))


async def test_a_worker_whose_pipe_broke_fails_its_batch() -> None:
    class BrokenWorker(FakeWorker):
        def send(self, job: BatchJob) -> None:
            raise BrokenPipeError("gone")

    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    scheduler.worker_idle(BrokenWorker(0))
    pending = scheduler.submit(request("a"))
    with pytest.raises(WorkerCrashed):
        await pending.future
    assert not scheduler.idle and not scheduler.in_flight


def test_split_keeps_consecutive_seeds() -> None:
    parts = request("big", n=10, seed=100).split(4)
    assert [(p.n, p.seed) for p in parts] == [(4, 100), (4, 104), (2, 108)]
    assert [s for p in parts for s in p.seeds] == list(range(100, 110))


async def test_device_free_hands_the_worker_its_next_batch_while_the_last_is_encoded() -> None:
    scheduler = Scheduler(max_batch=1, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    first, second = scheduler.submit(request("a")), scheduler.submit(request("b"))
    assert len(worker.jobs) == 1
    assert scheduler.releases_device(worker.jobs[0].batch_id)
    scheduler.device_free(worker, worker.jobs[0].batch_id)
    assert len(worker.jobs) == 2, "the second batch starts as soon as the device is free"
    assert not first.future.done(), "the first request waits for its encoded images"
    assert not scheduler.releases_device(worker.jobs[0].batch_id)
    # The first batch's result arrives while the second runs: it must not free the worker a second time.
    third = scheduler.submit(request("c"))
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    assert (await first.future).images[0].data == b"a"
    assert len(worker.jobs) == 2 and not third.future.done(), "the worker is still busy with batch 2"
    scheduler.batch_finished(worker, result_for(worker.jobs[1]))
    assert (await second.future).images[0].data == b"b"
    assert len(worker.jobs) == 3, "a result without DeviceFree frees the worker"


async def test_a_dead_worker_fails_both_its_running_and_its_encoding_batch() -> None:
    scheduler = Scheduler(max_batch=1, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    encoding, running = scheduler.submit(request("a")), scheduler.submit(request("b"))
    scheduler.device_free(worker, worker.jobs[0].batch_id)
    scheduler.worker_gone(0, "killed")
    for pending in (encoding, running):
        with pytest.raises(WorkerCrashed):
            await pending.future


async def test_completed_splits_the_time_between_device_encoder_and_transfer() -> None:
    now = [100.0]
    scheduler = Scheduler(max_batch=1, max_queue=10, batch_wait_s=0.0, clock=lambda: now[0])
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    pending = scheduler.submit(request("a"))
    now[0] += 0.5  # dispatch to delivery: 500 ms
    result = result_for(worker.jobs[0])
    result.inference_ms, result.denoise_ms, result.decode_ms, result.encode_ms = 400.0, 300.0, 100.0, 60.0
    scheduler.batch_finished(worker, result)
    done = await pending.future
    assert (done.denoise_ms, done.decode_ms, done.encode_ms) == (300.0, 100.0, 60.0)
    assert done.transfer_ms == pytest.approx(40.0)


async def test_a_running_batch_whose_clients_all_left_is_abandoned_once() -> None:
    abandoned: list[tuple[int, int]] = []
    scheduler = Scheduler(max_batch=2, max_queue=10, batch_wait_s=0.0)
    scheduler.on_abandoned = lambda worker_id, batch_id: abandoned.append((worker_id, batch_id))
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    blocker = scheduler.submit(request("x"))  # holds the worker, so the next two share a batch
    a, b = scheduler.submit(request("a")), scheduler.submit(request("b"))
    scheduler.batch_finished(worker, result_for(worker.jobs[0]))
    await blocker.future
    batch_id = worker.jobs[1].batch_id
    scheduler.cancel(a)
    assert abandoned == [], "one client is still waiting"
    scheduler.cancel(b)
    assert abandoned == [(0, batch_id)]
    scheduler.cancel(b)
    assert abandoned == [(0, batch_id)], "asked once"
    # Its (error) result frees the worker as usual.
    scheduler.batch_finished(worker, BatchResult(batch_id=batch_id, error="cancelled"))
    assert scheduler.idle


async def test_a_batch_already_being_encoded_is_not_abandoned() -> None:
    abandoned: list[tuple[int, int]] = []
    scheduler = Scheduler(max_batch=1, max_queue=10, batch_wait_s=0.0)
    scheduler.on_abandoned = lambda worker_id, batch_id: abandoned.append((worker_id, batch_id))
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    pending = scheduler.submit(request("a"))
    scheduler.device_free(worker, worker.jobs[0].batch_id)
    scheduler.cancel(pending)
    assert abandoned == []


async def test_a_late_message_of_a_dead_worker_does_not_bring_it_back() -> None:
    scheduler = Scheduler(max_batch=1, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    first = scheduler.submit(request("a"))
    job = worker.jobs[0]
    scheduler.worker_gone(0, "killed")
    with pytest.raises(WorkerCrashed):
        await first.future
    # The result was still in the pipe when the worker died: it must not put the worker back to work.
    assert not scheduler.releases_device(job.batch_id)
    scheduler.batch_finished(worker, result_for(job))
    assert not scheduler.idle
    later = scheduler.submit(request("b"))
    assert len(worker.jobs) == 1 and not later.future.done(), "it waits for a live worker"


async def test_retry_after_counts_a_worker_once_while_it_encodes_and_computes() -> None:
    scheduler = Scheduler(max_batch=1, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.worker_idle(worker)
    scheduler.submit(request("a"))
    scheduler.device_free(worker, worker.jobs[0].batch_id)  # idle again, its batch still in flight
    scheduler._batch_seconds_ema = 10.0
    for name in "bcd":
        scheduler.submit(request(name))
    # One worker: 2 requests queued behind the running one = 2 batches ahead of 10 s each.
    assert scheduler.retry_after_seconds() == 20


async def test_batches_only_of_the_sizes_a_worker_has_warm() -> None:
    """A worker still warming its batch sizes gets batches of warm sizes only: lone images that would make a
    batch of a cold size run apart, a request whose own size is cold waits, until a companion makes a warm size
    or its size is warmed."""
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    worker = FakeWorker(0)
    scheduler.sizes_warm(0, frozenset({1, 4}))
    scheduler.worker_idle(worker)
    busy = scheduler.submit(request("busy"))  # keeps the worker busy while the queue fills
    singles = [scheduler.submit(request(f"s{i}")) for i in range(2)]
    for index in range(3):
        scheduler.batch_finished(worker, result_for(worker.jobs[index]))
    await asyncio.gather(busy.future, *(s.future for s in singles))
    assert [job.num_images for job in worker.jobs] == [1, 1, 1], "two lone images make 2, not warm: apart"

    trio = scheduler.submit(request("trio", n=3))
    assert len(worker.jobs) == 3 and trio in scheduler.queue and 0 in scheduler.idle, "3 is not warm: held"
    companion = scheduler.submit(request("one"))  # 3 + 1 = 4, warm: they go together
    assert [item.request_id for item in worker.jobs[3].items] == ["trio", "one"]
    scheduler.batch_finished(worker, result_for(worker.jobs[3]))
    await asyncio.gather(trio.future, companion.future)

    again = scheduler.submit(request("trio2", n=3))
    assert len(worker.jobs) == 4
    scheduler.sizes_warm(0, frozenset({1, 3, 4}))  # size 3 warmed: it starts at once
    assert worker.jobs[-1].num_images == 3 and worker.jobs[-1].items[0].request_id == "trio2"
    scheduler.batch_finished(worker, result_for(worker.jobs[-1]))
    await again.future


async def test_a_request_goes_to_the_idle_worker_that_has_its_size_warm() -> None:
    scheduler = Scheduler(max_batch=4, max_queue=10, batch_wait_s=0.0)
    warming, warm = FakeWorker(0), FakeWorker(1)
    scheduler.sizes_warm(0, frozenset({1}))
    scheduler.worker_idle(warming)
    scheduler.worker_idle(warm)  # not listed: every size warm
    pair = scheduler.submit(request("pair", n=2))
    assert not warming.jobs and len(warm.jobs) == 1
    scheduler.batch_finished(warm, result_for(warm.jobs[0]))
    await pair.future
    scheduler.worker_gone(0, "gone")
    assert 0 not in scheduler.warm_sizes
