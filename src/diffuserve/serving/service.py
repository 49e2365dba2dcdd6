"""The serving facade the API calls: owns the scheduler and the worker pool; knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from diffuserve.config import Settings
from diffuserve.errors import DeadlineExceeded, ModelNotFound, NotReady, QueueFull
from diffuserve.hub import DownloadCancelled, PullError
from diffuserve.serving.adapters import AdapterResolver
from diffuserve.serving.engine_config import served_model_name
from diffuserve.serving.jobs.contracts import JobObserver, JobStatus
from diffuserve.serving.jobs.manager import JobManager
from diffuserve.serving.jobs.store import JobRecord
from diffuserve.serving.jobs.webhooks import check_url as check_webhook_url
from diffuserve.serving.model_service import ModelService
from diffuserve.serving.placement import check_fit, estimate_weight_bytes, place_models
from diffuserve.serving.scheduler import Pending
from diffuserve.serving.scheduler_hooks import PartialSink, ProgressSink, SchedulerObserver
from diffuserve.serving.worker_handle import WorkerState
from diffuserve.serving.worker_process import EngineFactory, load_engine
from diffuserve.types import Completed, GenerationRequest, LoraUse, ModelInfo

# What the API layer may use of the serving layer is this module: its service and these names.
__all__ = [
    "ClientGone",
    "EngineFactory",
    "GenerationService",
    "JobManager",
    "JobObserver",
    "JobRecord",
    "JobStatus",
    "ModelService",
    "PartialSink",
    "Pending",
    "ProgressSink",
    "SchedulerObserver",
    "WorkerState",
    "check_webhook_url",
    "load_engine",
]


log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its image was ready; nothing is sent back."""


class GenerationService:
    """Every served model's scheduler and workers behind one facade; a request reaches its model by name."""

    def __init__(
        self,
        settings: Settings,
        observer_for: Callable[[str], SchedulerObserver] | None = None,
        *,
        on_fatal: Callable[[str], None] | None = None,
        on_alive_changed: Callable[[int], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        on_watchdog: Callable[[], None] | None = None,
        engine_factory: EngineFactory = load_engine,
    ) -> None:
        """`observer_for(name)` gives the metrics hooks of one model's scheduler. Raises ValueError (with the
        numbers) when the models do not fit their devices."""
        self.settings = settings
        self.fatal_error: str | None = None
        self._on_fatal = on_fatal
        self._on_alive_changed = on_alive_changed
        placement = place_models(settings)
        cpu_workers = sum(1 for devices in placement.values() for device in devices if device == "cpu")
        self.models: dict[str, ModelService] = {}
        first_worker_id = 0
        for spec, devices in placement.items():
            service = ModelService(
                settings,
                spec,
                devices,
                observer=observer_for(served_model_name(settings, spec)) if observer_for else None,
                on_fatal=self._fatal,
                on_alive_changed=self._alive_changed,
                on_restart=on_restart,
                on_watchdog=on_watchdog,
                engine_factory=engine_factory,
                first_worker_id=first_worker_id,
                cpu_workers=cpu_workers,
            )
            first_worker_id += len(service.pool.slots)
            self.models[service.name] = service
        self._by_alias = _aliases(list(self.models.values()))
        self.adapters = AdapterResolver(settings)
        self.adapters.check_preloaded()
        self._starting: asyncio.Task[None] | None = None
        self._stopping = threading.Event()  # read by the pulls' threads
        self.started_at = time.time()

    async def start(self) -> None:
        """Pull the models not in the cache (the server answers health probes meanwhile), check again that the
        set fits its devices now that every size is known, then start every model's workers."""
        self.settings.export_hub_env()  # the hub library reads the cache folder and token from there
        self._starting = asyncio.create_task(self._start())

    async def _start(self) -> None:
        services = list(self.models.values())
        if self.adapters.catalog.hub:
            # Before any worker starts: the workers read the adapters named at start into their caches.
            try:
                await asyncio.to_thread(self.adapters.pull_hub, self.settings.hf_token, self._stopping)
            except (PullError, ValueError, DownloadCancelled) as exc:
                if not self._stopping.is_set():  # else: stopped on purpose, not a failure
                    self._fatal(f"could not pull an adapter: {exc}")
                return
            for service in services:
                service.pool.engine_config = replace(
                    service.pool.engine_config, lora_preload=self.adapters.preloaded_paths()
                )
        pulled = any(service.needs_pull for service in services)
        if not all(await asyncio.gather(*(service.pull() for service in services))):
            return
        if pulled:
            try:
                check_fit(
                    {service.spec: service.devices for service in services},
                    {service.spec: service.name for service in services},
                    lambda spec, device: estimate_weight_bytes(spec, self.settings, device),
                )
            except ValueError as exc:
                self._fatal(str(exc))
                return
        for service in services:
            service.start_workers()

    async def stop(self) -> None:
        self._stopping.set()
        # A pull still running stops at its next progress report (its thread cannot be cancelled from here).
        await asyncio.gather(*(service.stop() for service in self.models.values()))
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)

    def _fatal(self, message: str) -> None:
        # One model that can never load stops the server: it would otherwise stay unready for ever.
        self.fatal_error = self.fatal_error or message
        log.error("%s", message)
        if self._on_fatal is not None:
            self._on_fatal(message)

    def _alive_changed(self) -> None:
        if self._on_alive_changed is not None:
            self._on_alive_changed(sum(service.pool.alive for service in self.models.values()))

    @property
    def name(self) -> str:
        """The first model's name: what a request that names no model gets."""
        return next(iter(self.models))

    @property
    def ready(self) -> bool:
        """Every model has a worker loaded: a front that routes by readiness never sends a request to a
        server that would answer 503 for one of its models."""
        return all(service.ready for service in self.models.values())

    @property
    def worker_slots(self) -> list[tuple[int, str, tuple[str, ...]]]:
        """Each worker's id, model and devices (one, or a group's, leader first)."""
        return [
            (worker_id, service.name, slot)
            for service in self.models.values()
            for worker_id, slot in service.pool.slots.items()
        ]

    def describe_workers(self) -> list[dict[str, Any]]:
        """Each worker's id, model, devices, pid(s), state, restarts and start-up phases (the readiness body)."""
        return [worker for service in self.models.values() for worker in service.describe_workers()]

    def describe_models(self) -> list[dict[str, Any]]:
        """Each model's name, repo, devices and state (downloading, loading, ready or failed)."""
        return [service.describe() for service in self.models.values()]

    def service_for(self, requested: str | None) -> ModelService:
        """The served model a request names (by name or alias), or the first one when it names none."""
        if requested is None:
            return next(iter(self.models.values()))
        service = self._by_alias.get(requested)
        if service is None:
            raise ModelNotFound(
                f"model {requested!r} is not served here; available: {', '.join(self.models)}", param="model"
            )
        return service

    def model_for(self, requested: str | None) -> ModelInfo:
        """The limits and defaults of the model a request names (see `service_for`)."""
        model = self.service_for(requested).model
        # Once a worker has loaded the model, requests queue even while a dead worker is being replaced:
        # they start as soon as the replacement is ready (or hit their deadline).
        if model is None:
            raise NotReady("the model is still loading; retry shortly (see /health/ready)")
        return model

    async def resolve_adapters(
        self, model: ModelInfo, wanted: list[tuple[str, str | None, float]]
    ) -> tuple[LoraUse, ...]:
        """The adapters a request names, found and checked against its model (InvalidRequest naming `loras`
        otherwise); their files are read off the event loop."""
        if not wanted:
            return ()
        return await asyncio.to_thread(self.adapters.resolve, model, wanted)

    def describe_adapters(self) -> list[dict[str, Any]]:
        """Every adapter a request may name, and which served models take it (blocking: reads headers)."""
        loaded = [service.model for service in self.models.values() if service.model is not None]
        return self.adapters.describe(loaded)

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

    def submit(
        self,
        request: GenerationRequest,
        on_partial: PartialSink | None = None,
        on_progress: ProgressSink | None = None,
    ) -> list[Pending]:
        """Queue a request, or raise QueueFull before anything is queued. `on_partial` receives previews while
        the request's batch runs (streaming); none come after `wait` returns.

        A request of more images than MODEL_BATCH runs as several parts (consecutive seeds), so no batch
        exceeds the size the workers warmed up for; the answer waits for every part.
        """
        scheduler = self.models[request.model].scheduler
        pendings: list[Pending] = []
        try:
            for part in request.split(scheduler.max_batch):
                pendings.append(scheduler.submit(part, on_partial, on_progress))
        except QueueFull:
            for pending in pendings:
                scheduler.cancel(pending)
            raise
        return pendings

    def queue_position(self, pendings: list[Pending]) -> int | None:
        """Requests queued before the first still-queued part of a request; None once every part started."""
        positions = [
            position
            for pending in pendings
            if (position := self.models[pending.request.model].scheduler.position(pending)) is not None
        ]
        return min(positions) if positions else None

    def progress(self, pendings: list[Pending]) -> tuple[int, int] | None:
        """(step, steps) of the request's running part (the least advanced one), None while none runs."""
        running = [
            progress
            for pending in pendings
            if (progress := self.models[pending.request.model].scheduler.progress(pending)) is not None
        ]
        return min(running) if running else None

    def queued(self, model: str) -> int:
        """Requests waiting in a model's queue."""
        return len(self.models[model].scheduler.queue)

    def batch_capacity(self, model: str) -> int:
        """Images a model's workers take at once: its batch size × its workers."""
        service = self.models[model]
        return service.scheduler.max_batch * max(1, len(service.pool.slots))

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
                self.models[pending.request.model].scheduler.cancel(pending)
            if disconnect_task is not None:
                disconnect_task.cancel()


def _aliases(services: list[ModelService]) -> dict[str, ModelService]:
    """Alias → model; an alias two models share (two copies of one repo) names neither, only their names do."""
    owners: dict[str, list[ModelService]] = {}
    for service in services:
        for alias in service.aliases:
            owners.setdefault(alias, []).append(service)
    by_alias = {alias: found[0] for alias, found in owners.items() if len(found) == 1}
    by_alias.update({service.name: service for service in services})
    return by_alias


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
