"""The job manager: keeps each job in the store, feeds it to its model's scheduler through a priority gate,
queues it once more when its worker dies, cancels it at a step boundary, and sends its webhook."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from diffuserve.errors import (
    DiffuserveError,
    GenerationFailed,
    JobFinished,
    JobNotFound,
    NotReady,
    QueueFull,
    WorkerCrashed,
)
from diffuserve.job_settings import JobSettings
from diffuserve.serving.jobs.contracts import JobObserver, JobService, JobStatus, Payload, Prepare, Render
from diffuserve.serving.jobs.gate import PriorityGate
from diffuserve.serving.jobs.store import JobRecord, JobStore
from diffuserve.serving.jobs.webhooks import WebhookSender, backoff_s
from diffuserve.serving.priorities import PriorityRules
from diffuserve.serving.scheduler import Pending
from diffuserve.types import Completed, GenerationRequest, JobState, Priority

log = logging.getLogger(__name__)

# A job whose worker died is queued once more; a second death fails it (it may be what kills workers).
MAX_CRASHES = 2
# Webhook deliveries at once: each holds a thread while it waits for its receiver.
WEBHOOK_CONCURRENCY = 8
PURGE_EVERY_S = 60.0
T = TypeVar("T")


@dataclass(eq=False)
class LiveJob:
    record: JobRecord
    priority: Priority
    ticket: int
    task: asyncio.Task[None] | None = None
    pendings: list[Pending] = field(default_factory=list)
    in_gate: bool = False  # admitted to its model's scheduler
    cancelling: bool = False
    finishing: bool = False  # its outcome is being recorded: a cancel now waits for it
    last_step: tuple[int, int] | None = None  # (step, steps) its batch last reported
    side_tasks: set[asyncio.Task[Any]] = field(default_factory=set)


class JobManager:
    def __init__(
        self,
        service: JobService,
        settings: JobSettings,
        *,
        prepare: Prepare,
        render: Render,
        payload: Payload,
        observer: JobObserver | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self._prepare, self._render, self._payload = prepare, render, payload
        self._observer = observer
        self._db = ThreadPoolExecutor(1, thread_name_prefix="jobs-db")  # one writer, in order
        self._store: JobStore | None = None
        self._live: dict[str, LiveJob] = {}
        self._gates: dict[str, PriorityGate] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._deliveries = asyncio.Semaphore(WEBHOOK_CONCURRENCY)
        self.sender = (
            WebhookSender(
                settings.webhook_secret,
                allow_private=settings.webhook_allow_private,
                timeout=settings.webhook_timeout,
            )
            if settings.webhook_secret
            else None
        )

    # ---- life -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store; jobs a previous run left unfinished are run again, undelivered webhooks sent."""
        self._store = await self._call(JobStore, self.settings.jobs_db)
        unfinished = await self._call(self.store.unfinished)
        for record in unfinished:
            self._moved(None, record.state)
            self._launch(record, None)
        if unfinished:
            log.info("%d job(s) left unfinished by the last run are queued again", len(unfinished))
        for record in await self._call(self.store.webhooks_pending):
            self._spawn(self._deliver(record))
        self._spawn(self._purge_loop())

    async def stop(self) -> None:
        """Stop every job where it is: with JOBS_DB they run again at the next start."""
        tasks = [live.task for live in self._live.values() if live.task is not None] + list(self._background)
        tasks += [task for live in self._live.values() for task in live.side_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._store is not None:
            await self._call(self._store.close)
        self._db.shutdown(wait=True)

    @property
    def store(self) -> JobStore:
        assert self._store is not None, "the job manager has not started"
        return self._store

    # ---- requests -------------------------------------------------------------------------------------
    async def submit(self, record: JobRecord, generation: GenerationRequest) -> JobStatus:
        """Keep a validated job and start it; QueueFull when MAX_JOBS are unfinished."""
        if len(self._live) >= self.settings.max_jobs:
            raise QueueFull(
                f"the server holds {len(self._live)} unfinished jobs, its limit; retry later", retry_after=30
            )
        await self._call(self.store.add, record)
        self._moved(None, record.state)
        live = self._launch(record, generation)
        return self._status(live)

    async def get(self, job_id: str, owner: str) -> JobStatus:
        live = self._live.get(job_id)
        if live is not None and live.record.owner == owner:
            return self._status(live)
        record = await self._call(self.store.get, job_id)
        if record is None or record.owner != owner:
            raise JobNotFound(f"no job {job_id!r} (unknown, expired, or another API key's)", param="job_id")
        return JobStatus(record)

    async def owned(self, owner: str, limit: int, before: float | None) -> list[JobStatus]:
        records = await self._call(self.store.owned, owner, limit, before)
        return [self._status(self._live[r.id]) if r.id in self._live else JobStatus(r) for r in records]

    async def cancel(self, job_id: str, owner: str) -> JobStatus:
        """Cancel a queued or running job: a running batch that holds only this job stops at its next step."""
        live = self._live.get(job_id)
        if live is None or live.record.owner != owner:
            record = (await self.get(job_id, owner)).record  # JobNotFound for another key's
            if record.final:
                raise JobFinished(f"job {job_id} already ended: {record.state}", param="job_id")
            # Stored unfinished but not running here (it ended as the cancel came): it is not run again.
            record.state, record.finished_at = JobState.CANCELLED.value, time.time()
            await self._call(self.store.update, job_id, state=record.state, finished_at=record.finished_at)
            return JobStatus(record)
        task = live.task
        if not live.cancelling and not live.finishing and task is not None:
            live.cancelling = True
            task.cancel()
        if task is not None:
            await asyncio.wait({task})
        if live.record.state != JobState.CANCELLED.value:  # it ended on its own before the cancel took
            raise JobFinished(f"job {job_id} already ended: {live.record.state}", param="job_id")
        return JobStatus(live.record)

    # ---- one job --------------------------------------------------------------------------------------
    def _launch(self, record: JobRecord, generation: GenerationRequest | None) -> LiveJob:
        gate = self._gate(record.model)
        live = LiveJob(record, Priority(record.priority), gate.next_ticket())
        self._live[record.id] = live
        live.task = asyncio.create_task(self._run(live, generation), name=f"job {record.id}")
        return live

    async def _run(self, live: LiveJob, generation: GenerationRequest | None) -> None:
        record = live.record
        try:
            if generation is None:  # after a restart: validated again once the model is loaded
                await self._until_ready()
                generation = await self._prepare(record)
            generation.report_progress = True
            generation.priority = Priority(record.priority)
            async with self._gate(record.model).slot(live.priority, live.ticket, generation.n):
                live.in_gate = True
                done = await self._attempts(live, generation)
            answer = await self._render(record, generation, done)
            outcome: tuple[JobState, bytes | None, DiffuserveError | None] = (
                JobState.SUCCEEDED,
                answer,
                None,
            )
        except asyncio.CancelledError:
            if not live.cancelling:
                self._live.pop(record.id, None)
                raise  # the server is stopping: the job stays unfinished in the store
            outcome = (JobState.CANCELLED, None, None)
        except DiffuserveError as exc:
            outcome = (JobState.FAILED, None, exc)
        except Exception:
            log.exception("job %s failed", record.id)
            outcome = (JobState.FAILED, None, GenerationFailed("the job failed; see the server log"))
        # From here a cancel waits for the outcome instead of interrupting its record.
        live.finishing = True
        try:
            await asyncio.shield(self._finish(live, outcome[0], result=outcome[1], error=outcome[2]))
        finally:
            self._live.pop(record.id, None)

    async def _attempts(self, live: LiveJob, generation: GenerationRequest) -> Completed:
        record = live.record
        crashes = 0
        while True:
            record.attempts += 1
            await self._call(self.store.update, record.id, attempts=record.attempts)
            live.pendings = await self._submit(live, generation)
            remaining = record.created_at + self.settings.job_timeout - time.time()
            try:
                return await self.service.wait(live.pendings, timeout=max(0.001, remaining))
            except WorkerCrashed as exc:
                crashes += 1
                if crashes >= MAX_CRASHES:
                    raise
                log.warning("job %s: %s; queued once more", record.id, exc.message)
            finally:
                live.pendings = []

    async def _submit(self, live: LiveJob, generation: GenerationRequest) -> list[Pending]:
        """Into the scheduler; while its queue is full (synchronous requests fill it too), wait and retry."""
        while True:
            try:
                return self.service.submit(
                    generation, on_progress=lambda step, steps: self._running(live, step, steps)
                )
            except QueueFull as exc:
                await asyncio.sleep(min(5.0, max(0.1, exc.retry_after / 4)))

    def _running(self, live: LiveJob, step: int, steps: int) -> None:
        live.last_step = (step, steps)
        if live.record.state != JobState.RUNNING.value:
            old, live.record.state, live.record.started_at = (
                live.record.state,
                JobState.RUNNING.value,
                time.time(),
            )
            self._moved(old, live.record.state)
            update = self._call(self.store.update, live.record.id, state="running", started_at=time.time())
            task = asyncio.ensure_future(update)
            live.side_tasks.add(task)
            task.add_done_callback(live.side_tasks.discard)

    async def _finish(
        self,
        live: LiveJob,
        state: JobState,
        *,
        result: bytes | None = None,
        error: DiffuserveError | None = None,
    ) -> None:
        record = live.record
        old = record.state
        record.state, record.finished_at, record.result = state.value, time.time(), result
        if error is not None:
            record.error, record.error_status = orjson.dumps(error.envelope()), error.status
        if record.webhook_url:
            record.webhook_state = "pending"
        await self._call(
            self.store.update,
            record.id,
            state=record.state,
            finished_at=record.finished_at,
            result=result,
            error=record.error,
            error_status=record.error_status,
            webhook_state=record.webhook_state,
        )
        self._moved(old, record.state, final=True)
        if record.webhook_url:
            self._spawn(self._deliver(record))

    def _status(self, live: LiveJob) -> JobStatus:
        record = live.record
        if not live.in_gate:
            gate = self._gates[record.model]
            ahead = self.service.queued(record.model) + gate.position(live.priority, live.ticket)
            return JobStatus(record, position=ahead)
        if not live.pendings:  # between runs, or its images being stored: where it last was
            if live.last_step is not None:
                return JobStatus(record, step=live.last_step[0], steps=live.last_step[1])
            return JobStatus(record, position=0)
        progress = self.service.progress(live.pendings)
        if progress is not None:
            return JobStatus(record, step=progress[0], steps=progress[1])
        position = self.service.queue_position(live.pendings)
        return JobStatus(record, position=position or 0)

    # ---- webhooks -------------------------------------------------------------------------------------
    async def _deliver(self, record: JobRecord) -> None:
        """Post the finished job to its webhook until it answers 2xx, a final refusal, or the attempts run out."""
        assert record.webhook_url is not None
        if self.sender is None:  # stored by a run that had WEBHOOK_SECRET; this one cannot sign
            log.warning("job %s: webhook not sent: WEBHOOK_SECRET is not set", record.id)
            await self._call(self.store.update, record.id, webhook_state="failed")
            self._observe_webhook("given_up")
            return
        sender = self.sender
        body = self._payload(record)
        message_id = f"msg_{record.id}"
        # At least one more try, even where WEBHOOK_ATTEMPTS was lowered below what a previous run spent.
        last = max(self.settings.webhook_attempts, record.webhook_attempts + 1)
        for attempt in range(record.webhook_attempts + 1, last + 1):
            async with self._deliveries:
                delivery = await asyncio.to_thread(sender.send, record.webhook_url, message_id, body)
            record.webhook_attempts = attempt
            if delivery.delivered or not delivery.retry or attempt == last:
                record.webhook_state = "delivered" if delivery.delivered else "failed"
                await self._call(
                    self.store.update, record.id, webhook_state=record.webhook_state, webhook_attempts=attempt
                )
                if not delivery.delivered:
                    log.warning(
                        "job %s: webhook given up after %d attempt(s): %s",
                        record.id,
                        attempt,
                        delivery.problem,
                    )
                self._observe_webhook("delivered" if delivery.delivered else "given_up")
                return
            await self._call(self.store.update, record.id, webhook_attempts=attempt)
            self._observe_webhook("retried")
            await asyncio.sleep(backoff_s(attempt, self.settings.webhook_backoff_seconds))

    # ---- helpers --------------------------------------------------------------------------------------
    def _gate(self, model: str) -> PriorityGate:
        gate = self._gates.get(model)
        if gate is None:
            # Enough jobs in the scheduler to fill every worker's next batch, and no more: the queue stays
            # short for synchronous requests, which are refused (429) once it is full.
            gate = self._gates[model] = PriorityGate(
                lambda: 2 * self.service.batch_capacity(model),
                PriorityRules(aging_s=self.settings.priority_aging_seconds),
            )
        return gate

    async def _until_ready(self) -> None:
        while not self.service.ready:
            if self.service.fatal_error is not None:
                raise NotReady(f"the server cannot serve models: {self.service.fatal_error}")
            await asyncio.sleep(0.2)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_EVERY_S)
            gone = await self._call(self.store.purge, time.time() - self.settings.job_ttl_seconds)
            if gone:
                log.info("forgot %d finished job(s) older than %g s", gone, self.settings.job_ttl_seconds)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _moved(self, old: str | None, new: str | None, final: bool = False) -> None:
        if self._observer is not None:
            self._observer.job_moved(old, new, final)

    def _observe_webhook(self, outcome: str) -> None:
        if self._observer is not None:
            self._observer.webhook(outcome)
