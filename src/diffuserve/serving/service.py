"""The serving facade the API calls: owns the scheduler and the worker pool; knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from diffuserve.config import Settings
from diffuserve.errors import DeadlineExceeded, ModelNotFound, NotReady, QueueFull
from diffuserve.serving.engine_config import model_slug, served_model_name
from diffuserve.serving.scheduler import PartialSink, Pending, Scheduler, SchedulerObserver
from diffuserve.serving.worker_handle import WorkerState, resolve_devices
from diffuserve.serving.worker_process import EngineFactory, load_engine
from diffuserve.serving.workers import WorkerPool
from diffuserve.types import Completed, GenerationRequest, ModelInfo

# What the API layer may use of the serving layer is this module: its service and these names.
__all__ = [
    "ClientGone",
    "EngineFactory",
    "GenerationService",
    "PartialSink",
    "SchedulerObserver",
    "WorkerState",
    "load_engine",
]

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its image was ready; nothing is sent back."""


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        observer: SchedulerObserver | None = None,
        *,
        on_fatal: Callable[[str], None] | None = None,
        on_alive_changed: Callable[[int], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        on_watchdog: Callable[[], None] | None = None,
        engine_factory: EngineFactory = load_engine,
    ) -> None:
        self.settings = settings
        self.name = served_model_name(settings)
        self.aliases = {self.name, settings.model_repo, model_slug(settings.model_repo)}
        self.scheduler = Scheduler(
            max_batch=settings.model_batch,
            max_queue=settings.max_queue,
            batch_wait_s=settings.batch_wait_ms / 1000,
            observer=observer,
        )
        self.fatal_error: str | None = None
        self._on_fatal = on_fatal
        self.pool = WorkerPool(
            settings,
            resolve_devices(settings.devices),
            self.scheduler,
            on_fatal=self._fatal,
            on_alive_changed=on_alive_changed,
            on_restart=on_restart,
            on_watchdog=on_watchdog,
            engine_factory=engine_factory,
        )
        self.started_at = time.time()

    async def start(self) -> None:
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    def _fatal(self, message: str) -> None:
        self.fatal_error = message
        log.error("%s", message)
        if self._on_fatal is not None:
            self._on_fatal(message)

    @property
    def ready(self) -> bool:
        return self.pool.model is not None and self.pool.alive > 0

    @property
    def model(self) -> ModelInfo | None:
        """The served model's limits and defaults, once a worker has loaded it."""
        return self.pool.model

    @property
    def worker_slots(self) -> list[tuple[str, ...]]:
        """Each worker's devices: one, or a group's, leader first."""
        return self.pool.slots

    def describe_workers(self) -> list[dict[str, Any]]:
        """Each worker's id, devices, pid(s), state, restarts and start-up phases (the readiness body)."""
        return self.pool.describe()

    def model_for(self, requested: str | None) -> ModelInfo:
        """The served model a request names (by name or alias), or the only one when it names none."""
        if requested is not None and requested not in self.aliases:
            raise ModelNotFound(
                f"model {requested!r} is not served here; available: {self.name}", param="model"
            )
        model = self.pool.model
        # Once a worker has loaded the model, requests queue even while a dead worker is being replaced:
        # they start as soon as the replacement is ready (or hit their deadline).
        if model is None:
            raise NotReady("the model is still loading; retry shortly (see /health/ready)")
        return model

    async def generate(
        self,
        request: GenerationRequest,
        *,
        timeout: float,
        disconnected: Callable[[], Awaitable[object]] | None = None,
        on_partial: PartialSink | None = None,
    ) -> Completed:
        """Queue (QueueFull at once when there is no room), then wait: see `submit` and `wait`."""
        return await self.wait(self.submit(request, on_partial), timeout=timeout, disconnected=disconnected)

    def submit(self, request: GenerationRequest, on_partial: PartialSink | None = None) -> list[Pending]:
        """Queue a request, or raise QueueFull before anything is queued. `on_partial` receives previews while
        the request's batch runs (streaming); none come after `wait` returns.

        A request of more images than MODEL_BATCH runs as several parts (consecutive seeds), so no batch
        exceeds the size the workers warmed up for; the answer waits for every part.
        """
        pendings: list[Pending] = []
        try:
            for part in request.split(self.scheduler.max_batch):
                pendings.append(self.scheduler.submit(part, on_partial))
        except QueueFull:
            for pending in pendings:
                self.scheduler.cancel(pending)
            raise
        return pendings

    async def wait(
        self,
        pendings: list[Pending],
        *,
        timeout: float,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> Completed:
        """The submitted request's images; gives up (and frees its place) at the deadline, when the client
        leaves, or when the caller is cancelled."""
        waiting: set[asyncio.Future[Any]] = {p.future for p in pendings}
        disconnect_task = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        deadline = time.monotonic() + timeout
        try:
            while waiting:
                watched = waiting | ({disconnect_task} if disconnect_task is not None else set())
                remaining = deadline - time.monotonic()
                done, _ = await asyncio.wait(
                    watched, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
                )
                if disconnect_task is not None and disconnect_task in done:
                    raise ClientGone()
                if not done:
                    raise DeadlineExceeded(f"the request did not finish within its {timeout:g} s deadline")
                for future in done:
                    future.result()  # a failed part fails the request
                waiting -= done
            return _combine([p.future.result() for p in pendings])
        finally:
            for pending in pendings:
                self.scheduler.cancel(pending)
            if disconnect_task is not None:
                disconnect_task.cancel()


def _combine(parts: list[Completed]) -> Completed:
    """One answer from a request's parts: images in seed order, the longest wait and largest batch, the
    summed work of every part (parts may run on different workers at once, so these can exceed the wall time)."""
    if len(parts) == 1:
        return parts[0]
    return Completed(
        images=[image for part in parts for image in part.images],
        queue_ms=max(part.queue_ms for part in parts),
        inference_ms=sum(part.inference_ms for part in parts),
        batch_size=max(part.batch_size for part in parts),
        worker_id=parts[0].worker_id,
        denoise_ms=sum(part.denoise_ms for part in parts),
        decode_ms=sum(part.decode_ms for part in parts),
        encode_ms=sum(part.encode_ms for part in parts),
        transfer_ms=sum(part.transfer_ms for part in parts),
        text_tokens=max(part.text_tokens for part in parts),  # one prompt, read in every part
    )
