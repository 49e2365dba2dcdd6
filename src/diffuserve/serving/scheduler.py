"""Dynamic batcher: groups compatible requests, serves priority classes in order, dispatches to idle workers at
once, backpressure and deadlines."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from diffuserve.errors import GenerationFailed, QueueFull, WorkerCrashed
from diffuserve.messages import BatchResult, PartialImages, StepProgress
from diffuserve.serving.batching import BatchShape, next_batch
from diffuserve.serving.priorities import PriorityRules
from diffuserve.serving.scheduler_hooks import PartialSink, ProgressSink, SchedulerObserver
from diffuserve.types import BatchJob, Completed, GenerationRequest, Priority

log = logging.getLogger(__name__)


class WorkerSlot(Protocol):
    """What the scheduler needs of a worker: an id and a way to hand it a batch."""

    worker_id: int

    def send(self, job: BatchJob) -> None: ...


@dataclass(eq=False)
class Pending:
    request: GenerationRequest
    future: asyncio.Future[Completed]
    enqueued_at: float
    arrived_while_busy: bool
    dispatched_at: float | None = None
    on_partial: PartialSink | None = None
    on_progress: ProgressSink | None = None
    # Its batch was stopped for an interactive request once; it is not stopped again.
    preempted: bool = False

    @property
    def priority(self) -> Priority:
        return self.request.priority


@dataclass
class InFlight:
    worker_id: int
    pendings: list[Pending]
    job: BatchJob
    started_at: float
    # The worker said its device is done with this batch (DeviceFree); the images are still being encoded.
    device_released: bool = False
    # Every client of the batch has gone and the worker was asked to stop it.
    abandoned: bool = False
    # Stopped for an interactive request: its requests are queued again; its result is used only if it
    # finished before the stop reached it.
    preempted: bool = False
    step: int = 0


@dataclass
class Scheduler:
    max_batch: int
    max_queue: int
    batch_wait_s: float = 0.005
    observer: SchedulerObserver | None = None
    clock: Callable[[], float] = time.monotonic
    # Called with (worker id, batch id) when every request of a running batch has gone: the pool asks the
    # worker to stop it at its next step.
    on_abandoned: Callable[[int, int], None] | None = None
    # Whether a batch holds one adapter set only (LORA_BATCHING=split); otherwise each image row of a batch
    # applies its own request's adapters.
    split_adapters: bool = False
    rules: PriorityRules = field(default_factory=PriorityRules)
    queue: list[Pending] = field(default_factory=list, init=False)
    idle: dict[int, WorkerSlot] = field(default_factory=dict, init=False)
    # The batch sizes each worker has warmed (compiled, captured), where it warms them after it is ready; a
    # worker not listed runs every size as warm. A batch of another size would compile inside the request.
    warm_sizes: dict[int, frozenset[int]] = field(default_factory=dict, init=False)
    in_flight: dict[int, InFlight] = field(default_factory=dict, init=False)
    _batch_ids: itertools.count = field(default_factory=lambda: itertools.count(1), init=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False)
    _batch_seconds_ema: float | None = field(default=None, init=False)

    # ---- requests -------------------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        on_partial: PartialSink | None = None,
        on_progress: ProgressSink | None = None,
    ) -> Pending:
        """Queue a request; raises QueueFull when the queue is at its bound. `on_partial` receives its
        previews (streaming) while its batch runs, `on_progress` its steps."""
        if request.n > self.max_batch:
            # The service splits larger requests; a batch above MODEL_BATCH was never warmed up and may not fit.
            raise ValueError(f"a request of {request.n} images exceeds the batch limit of {self.max_batch}")
        if len(self.queue) >= self.max_queue:
            raise QueueFull(
                f"the server is at capacity ({len(self.queue)} requests queued); retry later",
                retry_after=self.retry_after_seconds(),
            )
        loop = asyncio.get_running_loop()
        pending = Pending(
            request=request,
            future=loop.create_future(),
            enqueued_at=self.clock(),
            arrived_while_busy=not self.idle,
            on_partial=on_partial,
            on_progress=on_progress,
        )
        self.queue.append(pending)
        self._report_depth()
        self._dispatch()
        if pending in self.queue and pending.priority is Priority.INTERACTIVE:
            self._preempt_for_interactive()
        return pending

    def position(self, pending: Pending) -> int | None:
        """How many queued requests go before this one (0: it is next), or None once it is not queued."""
        if pending not in self.queue:
            return None
        order = self.rules.order(self.queue, self.clock())
        return order.index(self.queue.index(pending))

    def progress(self, pending: Pending) -> tuple[int, int] | None:
        """(step, steps) of the running batch that holds this request, or None while it is not running."""
        for flight in self.in_flight.values():
            if pending in flight.pendings and not flight.preempted:
                return flight.step, flight.job.denoising_steps
        return None

    def cancel(self, pending: Pending) -> None:
        """The client left or its deadline passed: drop it if it has not started; a running batch whose every
        request is gone is stopped at its next step (on_abandoned)."""
        if pending in self.queue:
            self.queue.remove(pending)
            self._report_depth()
        if not pending.future.done():
            pending.future.cancel()
            if pending.dispatched_at is not None:
                self._abandon_if_unwanted(pending)

    def _abandon_if_unwanted(self, pending: Pending) -> None:
        """Stop the running batch that holds this request when nobody waits for any of its images (a request
        stopped for an interactive one may sit in an old, stopping batch and in the one it runs in now)."""
        for batch_id, flight in self.in_flight.items():
            if pending not in flight.pendings or flight.preempted:
                continue
            if flight.abandoned or flight.device_released:
                continue  # already stopping, or only being encoded: nothing left to save
            if all(p.future.done() for p in flight.pendings):
                flight.abandoned = True
                if self.on_abandoned is not None:
                    self.on_abandoned(flight.worker_id, batch_id)

    def retry_after_seconds(self) -> int:
        """A client-facing estimate of when a slot frees: queued batches × recent batch time."""
        per_batch = self._batch_seconds_ema or 1.0
        # A worker may be idle while its last batch is still encoded, or hold two batches: count it once.
        workers = max(1, len(set(self.idle) | {flight.worker_id for flight in self.in_flight.values()}))
        batches_ahead = math.ceil(len(self.queue) / (self.max_batch * workers))
        return max(1, math.ceil(per_batch * batches_ahead))

    # ---- workers --------------------------------------------------------------------------------------
    def worker_idle(self, worker: WorkerSlot) -> None:
        self.idle[worker.worker_id] = worker
        self._dispatch()

    def sizes_warm(self, worker_id: int, sizes: frozenset[int] | None) -> None:
        """The batch sizes `worker_id` can run without compiling (None: every size); the queue is looked at
        again, as a batch that waited for a size may now start."""
        if sizes is None:
            self.warm_sizes.pop(worker_id, None)
        else:
            self.warm_sizes[worker_id] = sizes
        if worker_id in self.idle:
            self._dispatch()

    def worker_gone(self, worker_id: int, reason: str) -> None:
        """A worker died: fail only the requests of the batch it held, at once."""
        self.idle.pop(worker_id, None)
        self.warm_sizes.pop(worker_id, None)
        for batch_id, flight in list(self.in_flight.items()):
            if flight.worker_id == worker_id:
                del self.in_flight[batch_id]
                if flight.preempted:
                    continue  # its requests are already queued again
                for pending in flight.pendings:
                    _fail(pending, WorkerCrashed(f"the worker running this request stopped: {reason}"))

    def releases_device(self, batch_id: int) -> bool:
        """Whether the worker's next message about this batch frees its device: true until DeviceFree came."""
        flight = self.in_flight.get(batch_id)
        return flight is not None and not flight.device_released

    def device_free(self, worker: WorkerSlot, batch_id: int) -> None:
        """The worker's device finished `batch_id` (its images are being encoded): give it the next batch."""
        flight = self.in_flight.get(batch_id)
        if flight is None or flight.device_released:
            return
        flight.device_released = True
        self._record_batch_time(flight)
        self.worker_idle(worker)

    def partial_images(self, message: PartialImages) -> None:
        """A running batch's preview of one request's images: to that request, while it still waits."""
        flight = self.in_flight.get(message.batch_id)
        if flight is None or flight.preempted or not 0 <= message.item_index < len(flight.pendings):
            return
        pending = flight.pendings[message.item_index]
        if pending.on_partial is not None and not pending.future.done():
            pending.on_partial(message.partial_index, pending.request.first_image, message.images)

    def step_progress(self, message: StepProgress) -> None:
        """A running batch finished a denoising step: to the requests that asked to hear of it."""
        flight = self.in_flight.get(message.batch_id)
        if flight is None or flight.preempted:
            return
        flight.step = message.step
        for pending in flight.pendings:
            if pending.on_progress is not None and not pending.future.done():
                pending.on_progress(message.step, message.steps)

    def batch_finished(self, worker: WorkerSlot, result: BatchResult) -> None:
        """A batch's images (or its error) are back. The worker is idle now unless DeviceFree already said so
        (it may be running the next batch)."""
        flight = self.in_flight.pop(result.batch_id, None)
        if flight is None:
            return  # its worker was given up (died, or killed by the watchdog): nothing to deliver or free
        if not flight.device_released:
            self._record_batch_time(flight)
        self._deliver(flight, result)
        if not flight.device_released:
            self.worker_idle(worker)

    # ---- internals ------------------------------------------------------------------------------------
    def _record_batch_time(self, flight: InFlight) -> None:
        # The device's time per batch is what paces the queue (encoding overlaps the next batch).
        elapsed = self.clock() - flight.started_at
        ema = self._batch_seconds_ema
        self._batch_seconds_ema = elapsed if ema is None else 0.8 * ema + 0.2 * elapsed

    def _deliver(self, flight: InFlight, result: BatchResult) -> None:
        if self.observer is not None and (result.adapter_loads or result.adapter_hits):
            self.observer.adapters_used(result.adapter_loads, result.adapter_hits)
        if self.observer is not None and (result.prompt_hits or result.prompt_misses):
            self.observer.prompts_encoded(result.prompt_hits, result.prompt_misses)
        if result.error is None and len(result.images) != len(flight.pendings):
            result.error = f"worker returned {len(result.images)} results for {len(flight.pendings)} requests"
        again: list[Pending] = []  # requests of a stopped batch already running in a new one
        if flight.preempted:
            if result.error is not None:
                return  # stopped as asked: its requests are queued again
            # It finished before the stop reached it: its requests take these images, whether they wait in
            # the queue again or already run in a new batch (stopped below once nobody waits for it).
            again = [p for p in flight.pendings if p not in self.queue and p.dispatched_at is not None]
            for pending in flight.pendings:
                if pending in self.queue:
                    self.queue.remove(pending)
                    pending.dispatched_at = flight.started_at
            self._report_depth()
        for index, pending in enumerate(flight.pendings):
            if result.error is not None:
                _fail(pending, GenerationFailed(f"generation failed: {result.error}"))
                continue
            images = result.images[index]
            if len(images) != pending.request.n:
                _fail(
                    pending,
                    GenerationFailed(f"worker returned {len(images)} images, expected {pending.request.n}"),
                )
                continue
            if not pending.future.done():
                assert pending.dispatched_at is not None
                in_worker_ms = (self.clock() - pending.dispatched_at) * 1000
                pending.future.set_result(
                    Completed(
                        images=images,
                        queue_ms=(pending.dispatched_at - pending.enqueued_at) * 1000,
                        inference_ms=result.inference_ms,
                        batch_size=flight.job.num_images,
                        worker_id=flight.worker_id,
                        denoise_ms=result.denoise_ms,
                        decode_ms=result.decode_ms,
                        encode_ms=result.encode_ms,
                        transfer_ms=max(0.0, in_worker_ms - result.inference_ms - result.encode_ms),
                        text_tokens=result.text_tokens[index] if index < len(result.text_tokens) else 0,
                    )
                )
        for pending in again:
            self._abandon_if_unwanted(pending)

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        shape = BatchShape(self.max_batch, self._key, self.rules)
        while self.idle and self.queue:
            now = self.clock()
            ordered = [self.queue[i] for i in self.rules.order(self.queue, now)]
            chosen = next_batch(ordered, list(self.idle), self.warm_sizes, shape, now)
            if chosen is None:
                return  # no idle worker has the size any waiting request needs warm yet: its warm-up will call
            worker_id, group = chosen
            head = group[0]
            images = sum(p.request.n for p in group)
            # The window only holds back requests that queued while every worker was busy: a lone request
            # on an idle worker starts at once, and the wait is measured from the first request of the group.
            # An interactive head is never held: its class asks for latency over company, and a request that
            # stopped a batch job for its turn would otherwise wait out the window after the stop.
            wait_left = head.enqueued_at + self.batch_wait_s - self.clock()
            held = head.arrived_while_busy and head.priority is not Priority.INTERACTIVE
            if held and images < self.max_batch and wait_left > 0:
                self._timer = asyncio.get_running_loop().call_later(wait_left, self._dispatch)
                return
            self._start(worker_id, group)

    def _key(self, request: GenerationRequest) -> object:
        return (request.batch_key, request.loras) if self.split_adapters else request.batch_key

    def _start(self, worker_id: int, group: list[Pending]) -> None:
        worker = self.idle.pop(worker_id)
        now = self.clock()
        for pending in group:
            self.queue.remove(pending)
            pending.dispatched_at = now
        job = BatchJob.of(next(self._batch_ids), [p.request for p in group])
        preemptible = self.rules.preempt and all(p.priority is Priority.BATCH for p in group)
        for item in job.items if preemptible else ():  # preemption weighs the steps left: reported
            item.report_progress = True
        self.in_flight[job.batch_id] = InFlight(worker_id=worker_id, pendings=group, job=job, started_at=now)
        self._report_depth()
        if self.observer is not None:
            self.observer.batch_started(
                job.num_images, [now - p.enqueued_at for p in group], [p.priority for p in group]
            )
        try:
            worker.send(job)
        except (OSError, ValueError) as exc:  # the worker's pipe broke: it is dying, its reaper will follow
            log.warning("could not send batch %d to worker %d: %s", job.batch_id, worker_id, exc)
            self.worker_gone(worker_id, f"its connection broke ({exc})")

    def _preempt_for_interactive(self) -> None:
        """Every worker is busy and an interactive request waits: stop one running batch of `batch` work at its
        next step (PriorityRules.may_preempt) and queue its requests again, so the interactive request waits
        about one step instead of the batch's remaining steps. One batch per waiting interactive request."""
        if self.on_abandoned is None or self.idle:
            return
        waiting = sum(1 for p in self.queue if p.priority is Priority.INTERACTIVE)
        stopping = sum(1 for f in self.in_flight.values() if f.preempted)
        if waiting <= stopping:
            return
        for batch_id, flight in self.in_flight.items():
            if flight.preempted or flight.abandoned or flight.device_released:
                continue
            if not self.rules.may_preempt(
                flight.pendings, flight.step, flight.job.denoising_steps, self.clock()
            ):
                continue
            flight.preempted = True
            requeued = [p for p in flight.pendings if not p.future.done()]
            for pending in requeued:
                pending.preempted, pending.dispatched_at = True, None
                self.queue.append(pending)
            log.info("batch %d stopped at step %d for an interactive request", batch_id, flight.step)
            if self.observer is not None:
                self.observer.preempted(len(requeued))
            self._report_depth()
            self.on_abandoned(flight.worker_id, batch_id)
            return

    def _report_depth(self) -> None:
        if self.observer is not None:
            by_priority = dict.fromkeys(Priority, 0)
            for pending in self.queue:
                by_priority[pending.priority] += 1
            self.observer.queue_depth(len(self.queue), by_priority)


def _fail(pending: Pending, error: Exception) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
