"""One served model: its name and aliases, its scheduler and its worker pool (batches never leave it)."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffuserve.config import LoraBatching, Settings
from diffuserve.hub import PullError, cached_snapshot, is_cached, pull
from diffuserve.hub.progress import DownloadCancelled, PullProgress, log_progress
from diffuserve.model_specs import ModelSpec
from diffuserve.serving.engine_config import engine_config
from diffuserve.serving.priorities import PriorityRules
from diffuserve.serving.scheduler import Scheduler
from diffuserve.serving.scheduler_hooks import SchedulerObserver
from diffuserve.serving.worker_process import EngineFactory, load_engine
from diffuserve.serving.workers import WorkerPool
from diffuserve.types import ModelInfo

log = logging.getLogger(__name__)

# The hub's repo ids: an owner and a name, of letters, digits, '-', '_' and '.'.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ModelService:
    def __init__(
        self,
        settings: Settings,
        spec: ModelSpec,
        devices: list[str],
        *,
        observer: SchedulerObserver | None = None,
        on_fatal: Callable[[str], None],
        on_alive_changed: Callable[[], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        on_watchdog: Callable[[], None] | None = None,
        engine_factory: EngineFactory = load_engine,
        first_worker_id: int = 0,
        cpu_workers: int | None = None,
    ) -> None:
        self.spec = spec
        self.config = engine_config(settings, spec)
        self.name = self.config.model_name
        self.aliases = spec.aliases(self.name)
        self.devices = devices
        self.scheduler = Scheduler(
            max_batch=settings.model_batch,
            max_queue=settings.max_queue,
            batch_wait_s=settings.batch_wait_ms / 1000,
            observer=observer,
            split_adapters=settings.lora_batching is LoraBatching.SPLIT,
            # A worker group's ranks cannot stop mid-batch (they would leave a collective out of step).
            rules=PriorityRules(
                aging_s=settings.priority_aging_seconds, preempt=settings.preempt and settings.parallel <= 1
            ),
        )
        self.fatal_error: str | None = None
        self._on_fatal = on_fatal
        self.hf_token = settings.hf_token
        # Before the workers start: `downloading` (with `download`, the latest progress), then `loading`.
        self.phase = "starting"
        self.download: PullProgress | None = None
        self.stopping = threading.Event()
        self.pool = WorkerPool(
            settings,
            devices,
            self.scheduler,
            on_fatal=self._fatal,
            on_alive_changed=(lambda _alive: on_alive_changed()) if on_alive_changed else None,
            on_restart=on_restart,
            on_watchdog=on_watchdog,
            engine_factory=engine_factory,
            config=self.config,
            first_worker_id=first_worker_id,
            cpu_workers=cpu_workers,
        )

    @property
    def needs_pull(self) -> bool:
        return needs_pull(self.spec.repo, self.config.weights)

    async def pull(self) -> bool:
        """Pull the model where it comes from the hub and is not in the cache yet, its progress in the log and
        in readiness. False when it failed (the server stops, in one line) or the server is stopping."""
        if not self.needs_pull:
            return True
        self.phase = "downloading"
        report = log_progress(self.name, logger=log)

        def progress(done: PullProgress) -> None:
            if self.stopping.is_set():
                raise DownloadCancelled(self.spec.repo)  # the pull stops; its partial files stay for a resume
            self.download = done
            report(done)

        log.info("%s is not in the hub cache: pulling %s", self.name, self.spec.repo)
        try:
            await asyncio.to_thread(pull, self.spec.repo, token=self.hf_token, progress=progress)
        except (PullError, DownloadCancelled) as exc:
            if not self.stopping.is_set():  # else: stopped on purpose, not a failure
                self._fatal(f"could not pull the model {self.name}: {exc}")
            return False
        return not self.stopping.is_set()

    def start_workers(self) -> None:
        """Start the workers; a hub model's are told its folder in the cache, so they never ask the hub."""
        if self.stopping.is_set():
            return
        if HUB_ID.fullmatch(self.spec.repo) and self.config.weights != "random":
            snapshot = cached_snapshot(self.spec.repo)
            if snapshot is not None:
                self.pool.engine_config = replace(self.pool.engine_config, model_path=str(snapshot))
        self.phase = "loading"
        self.pool.start()

    async def stop(self) -> None:
        self.stopping.set()
        await self.pool.stop()

    def _fatal(self, message: str) -> None:
        self.fatal_error = message
        self._on_fatal(message)  # the server logs it and stops

    @property
    def ready(self) -> bool:
        return self.pool.model is not None and self.pool.alive > 0

    @property
    def model(self) -> ModelInfo | None:
        """The model's limits and defaults, once a worker has loaded it."""
        return self.pool.model

    def describe_workers(self) -> list[dict[str, Any]]:
        return [{**worker, "model": self.name} for worker in self.pool.describe()]

    def describe(self) -> dict[str, Any]:
        """Name, repo, devices, status (downloading, loading, ready or failed), and the download's progress."""
        status = "failed" if self.fatal_error else "ready" if self.ready else self.phase
        described: dict[str, Any] = {
            "name": self.name,
            "repo": self.spec.repo,
            "devices": self.devices,
            "status": status,
        }
        if self.download is not None and status == "downloading":
            described["download"] = self.download.as_dict()
        if self.fatal_error:
            described["error"] = self.fatal_error
        return described


def needs_pull(repo: str, weights: str) -> bool:
    """A hub repo id (`org/name`, not a built-in model, not a local folder) whose pipeline is not complete in
    the cache. Anything else is the loader's to find or refuse."""
    if weights == "random" or not HUB_ID.fullmatch(repo) or Path(repo).expanduser().exists():
        return False
    return not is_cached(repo)
