"""Worker processes: one per GPU (or one CPU worker); started, watched, and replaced when one dies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, cast

from diffuserve.config import SERVER_ONLY_SECRETS, Settings
from diffuserve.engine.config import EngineConfig
from diffuserve.messages import (
    BatchResult,
    BatchSizeWarm,
    CancelBatch,
    CompileCacheSaved,
    DeviceFree,
    GroupRank,
    PartialImages,
    Shutdown,
    StepProgress,
    WorkerFailed,
    WorkerPhase,
    WorkerReady,
)
from diffuserve.models.registry import is_builtin
from diffuserve.serving.engine_config import engine_config
from diffuserve.serving.scheduler import Scheduler
from diffuserve.serving.watchdog import BatchLimits
from diffuserve.serving.worker_group import (
    GroupConnection,
    GroupProcess,
    exit_reason,
    plan_groups,
    start_ranks,
)
from diffuserve.serving.worker_handle import WorkerProcess, WorkerState
from diffuserve.serving.worker_process import EngineFactory, child_entry, load_engine
from diffuserve.types import ModelInfo

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 30.0
# How often the watchdog looks at the running batches.
WATCHDOG_PERIOD_S = 1.0
# A worker that ran this long before dying is considered healthy: its replacement starts without delay.
STABLE_AFTER_S = 60.0
# Before any worker was ever ready, this many deaths in a row (without a message) mean the model can't load.
MAX_START_ATTEMPTS = 3


class WorkerPool:
    """Starts the workers, relays their messages onto the event loop, and replaces the ones that die."""

    def __init__(
        self,
        settings: Settings,
        devices: list[str],
        scheduler: Scheduler,
        *,
        on_fatal: Callable[[str], None],
        on_alive_changed: Callable[[int], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        on_watchdog: Callable[[], None] | None = None,
        engine_factory: EngineFactory = load_engine,
        config: EngineConfig | None = None,
        first_worker_id: int = 0,
        cpu_workers: int | None = None,
    ) -> None:
        """`config` is the model's (default: the first served model's); worker ids start at
        `first_worker_id`, so the pools of several models number their workers apart; `cpu_workers` is the
        number of CPU workers of every pool, which share the cores."""
        self.settings = settings
        # All a worker is told (never `settings`: it holds the API keys).
        self.engine_config: EngineConfig = config or engine_config(settings)
        self.label = self.engine_config.model_name  # names the model in the pool's log lines
        self.engine_factory = engine_factory
        self.on_watchdog = on_watchdog
        # Per worker slot: how long its batches may run (a replacement inherits what its slot learned).
        self.limits: dict[int, BatchLimits] = {}
        scheduler.on_abandoned = self._cancel_batch
        self.devices = devices
        # One slot per worker: a device, or a group of PARALLEL devices that runs one pipeline.
        self.slots = {
            first_worker_id + index: slot
            for index, slot in enumerate(plan_groups(devices, settings.parallel))
        }
        self.cpu_workers = cpu_workers if cpu_workers is not None else sum(1 for d in devices if d == "cpu")
        self.scheduler = scheduler
        self.on_fatal = on_fatal
        self.on_alive_changed = on_alive_changed
        self.on_restart = on_restart
        self.workers: dict[int, WorkerProcess] = {}
        self._replacements: Counter[int] = Counter()
        self.model: ModelInfo | None = None
        self._ctx = mp.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._ever_ready = False

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # A worker inherits this process's environment, so it is shaped here, once: the API keys, read into the
        # settings already, go; the hub's folder and token, which the hub library reads there, come in.
        for name in SERVER_ONLY_SECRETS:
            os.environ.pop(name, None)
        self.settings.export_hub_env()
        for worker_id, slot in self.slots.items():
            if len(slot) == 1:
                self._spawn(worker_id, slot[0], failures_in_a_row=0)
            else:
                self._spawn_group(worker_id, slot, failures_in_a_row=0)
        self._loop.call_later(WATCHDOG_PERIOD_S, self._watch)

    async def stop(self, timeout: float = 10.0) -> None:
        """Idle workers get Shutdown and `timeout` s to exit; busy and still-loading ones are killed at once
        (neither reads its pipe before its batch or its load ends, and by now the API has answered every
        request); stragglers are killed. All in parallel, so stopping takes at most `timeout` s plus a kill,
        whatever the number of workers."""
        self._stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            if worker.state in (WorkerState.BUSY, WorkerState.STARTING):
                worker.process.kill()
            else:
                worker.outbox.put(Shutdown())

        def reap(worker: WorkerProcess) -> None:
            worker.process.join(timeout)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(2.0)

        await asyncio.gather(*(asyncio.to_thread(reap, worker) for worker in workers))

    @property
    def alive(self) -> int:
        return sum(1 for w in self.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY))

    def describe(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self.workers.values()]

    # ---- internals ------------------------------------------------------------------------------------
    def _spawn(self, worker_id: int, device: str, failures_in_a_row: int) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        env_threads = self._cpu_threads(device)
        process = self._ctx.Process(
            target=child_entry,
            args=(worker_id, device, self.engine_config, child_conn, env_threads, None, self.engine_factory),
            name=f"diffuserve-worker-{worker_id}",
            daemon=True,
        )
        process.start()
        child_conn.close()  # so the parent sees EOF as soon as the child dies
        worker = WorkerProcess(
            worker_id=worker_id,
            device=device,
            process=process,
            conn=parent_conn,
            started_at=time.monotonic(),
            pid=process.pid,
            failures_in_a_row=failures_in_a_row,
            replacements=self._replacements[worker_id],
        )
        self.workers[worker_id] = worker
        threading.Thread(
            target=self._reader, args=(worker,), name=f"worker-{worker_id}-reader", daemon=True
        ).start()

    def _spawn_group(self, worker_id: int, devices: tuple[str, ...], failures_in_a_row: int) -> None:
        """One process per device, started together; they meet on a fresh port and the pool sees one worker."""

        def args_for(rank: GroupRank, device: str, conn: Connection) -> tuple[Any, ...]:
            threads = self._cpu_threads(device)
            return worker_id, device, self.engine_config, conn, threads, rank, self.engine_factory

        name = f"diffuserve-worker-{worker_id}"
        group, conns = start_ranks(self._ctx, devices, args_for, entry=child_entry, name=name)
        worker = WorkerProcess(
            worker_id=worker_id,
            device=",".join(devices),
            process=group,
            conn=conns,  # type: ignore[arg-type]
            started_at=time.monotonic(),
            pid=group.pid,
            failures_in_a_row=failures_in_a_row,
            replacements=self._replacements[worker_id],
            devices=devices,
        )
        self.workers[worker_id] = worker
        for rank in range(len(devices)):
            threading.Thread(
                target=self._group_reader, args=(worker, group, rank), name=f"worker-{worker_id}.{rank}-reader",
                daemon=True,
            ).start()  # fmt: skip

    def _group_reader(self, worker: WorkerProcess, group: GroupProcess, rank: int) -> None:
        """One rank's pipe. When any rank goes, the group cannot go on (its peers would wait in a collective):
        every rank is killed before the pool hears of it, so none outlives its group or holds a GPU."""
        conn = cast(GroupConnection, worker.conn).conns[rank]
        self._relay(worker, conn, f"worker {worker.worker_id} rank {rank}")
        process = group.processes[rank]
        process.join(timeout=2.0)
        first = group.rank_down(rank)
        if not self._stopping:
            group.kill()
        group.join(timeout=10.0 if self._stopping else 5.0)
        conn.close()
        if first:
            self._call_soon(self._on_exit, worker)

    def _cpu_threads(self, device: str) -> int | None:
        if device != "cpu":
            return None
        if self.settings.cpu_threads:
            return self.settings.cpu_threads
        # The built-in models' ops are too small to split: one thread is faster, and leaves a core to the API
        # process (docs/design/serving.md). Other models share the cores among the CPU workers.
        if is_builtin(self.engine_config.model_repo):
            return 1
        return max(1, len(os.sched_getaffinity(0)) // max(1, self.cpu_workers))

    def _reader(self, worker: WorkerProcess) -> None:
        """Runs in a thread: blocking reads from the pipe, each message handed to the event loop."""
        assert self._loop is not None
        self._relay(worker, worker.conn, f"worker {worker.worker_id}")
        # Reap here, off the event loop: a worker that broke its pipe without dying (an unreadable message)
        # is killed, so no orphan keeps holding a GPU after its replacement starts.
        worker.process.join(timeout=2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5.0)
        worker.conn.close()
        self._call_soon(self._on_exit, worker)

    def _relay(self, worker: WorkerProcess, conn: Any, who: str) -> None:
        """Blocking reads from one pipe, each message handed to the event loop, until the pipe closes or
        sends something unreadable (an unpicklable message: the sender counts as broken)."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            except Exception as exc:
                log.error("%s sent an unreadable message: %s", who, exc)
                return
            self._call_soon(self._on_message, worker, message)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the loop already closed during shutdown; nothing is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_message(self, worker: WorkerProcess, message: Any) -> None:
        if self.workers.get(worker.worker_id) is not worker or worker.state == WorkerState.DEAD:
            return  # a message that was still in the pipe of a worker already given up
        if isinstance(message, WorkerReady):
            worker.ready = message
            worker.ready_at = time.monotonic()
            if not worker.cold_sizes():
                worker.warm_at = worker.ready_at
            self._limits_of(worker.worker_id).record_warmups(message.model, message.phases)
            log.info(
                "worker %d (%s) start-up phases (s): %s", worker.worker_id, self.label, worker.start_phases()
            )
            worker.pid = message.pid
            worker.state = WorkerState.IDLE
            self.model = self.model or message.model
            self._ever_ready = True
            self._alive_changed()
            self.scheduler.sizes_warm(worker.worker_id, worker.warm_sizes)
            self.scheduler.worker_idle(worker)
        elif isinstance(message, BatchSizeWarm):  # one more batch size the scheduler may give it
            if worker.size_warm(message.size, message.seconds):
                log.info("worker %d (%s) has every batch size warm; start-up phases (s): %s",
                         worker.worker_id, self.label, worker.start_phases())  # fmt: skip
            self.scheduler.sizes_warm(worker.worker_id, worker.warm_sizes)
        elif isinstance(message, CompileCacheSaved):  # the worker's own log says where, or why not
            worker.compile_cache = message
        elif isinstance(message, WorkerPhase):
            worker.phase, worker.phase_detail = message.phase, message.detail
        elif isinstance(message, WorkerFailed):
            # In a group, the first rank to fail says why; its peers' errors follow from it.
            if worker.failure is None:
                worker.failure, worker.failure_fatal = message.error, message.fatal
        elif isinstance(message, DeviceFree):
            # Idle before the scheduler hears it, which may hand this worker its next batch (and mark it busy).
            if self.scheduler.releases_device(message.batch_id):
                worker.state = WorkerState.IDLE
            self.scheduler.device_free(worker, message.batch_id)
        elif isinstance(message, PartialImages):
            self.scheduler.partial_images(message)
        elif isinstance(message, StepProgress):
            self.scheduler.step_progress(message)
        elif isinstance(message, BatchResult):
            flight = self.scheduler.in_flight.get(message.batch_id)
            if flight is not None and message.error is None and message.inference_ms > 0:
                self._limits_of(worker.worker_id).record(flight.job, message.inference_ms / 1000)
            if self.scheduler.releases_device(message.batch_id):
                worker.state = WorkerState.IDLE
            self.scheduler.batch_finished(worker, message)

    def _on_exit(self, worker: WorkerProcess) -> None:
        if self.workers.get(worker.worker_id) is not worker or worker.state == WorkerState.DEAD:
            return
        worker.state = WorkerState.DEAD
        worker.outbox.close()
        self._alive_changed()
        reason = worker.failure or exit_reason(worker.process)
        self.scheduler.worker_gone(worker.worker_id, reason)
        if self._stopping:
            return
        failed_for_good = worker.failure is not None and worker.failure_fatal
        if not self._ever_ready and (failed_for_good or worker.failures_in_a_row >= MAX_START_ATTEMPTS - 1):
            # The model cannot load at all (bad path, gated repo, a crash while loading …): restarting
            # would loop forever while the server stays unready. A passing failure (a group whose rendezvous
            # port was taken) gets MAX_START_ATTEMPTS.
            self.on_fatal(f"worker {worker.worker_id} could not load the model {self.label}: {reason}")
            return
        log.error(
            "worker %d (%s, pid %s) died: %s; starting a replacement", worker.worker_id, self.label, worker.pid,
            reason,
        )  # fmt: skip
        ran_for = time.monotonic() - worker.started_at
        delay = (
            0.0 if ran_for > STABLE_AFTER_S else min(RESTART_BACKOFF_MAX_S, 0.5 * 2**worker.failures_in_a_row)
        )
        self._replacements[worker.worker_id] += 1
        if self.on_restart is not None:
            self.on_restart()
        assert self._loop is not None
        in_a_row = 0 if ran_for > STABLE_AFTER_S else worker.failures_in_a_row + 1
        self._loop.call_later(delay, self._respawn, worker.worker_id, worker.device, in_a_row)

    # ---- watchdog and cancellation ------------------------------------------------------------------
    def _limits_of(self, worker_id: int) -> BatchLimits:
        if worker_id not in self.limits:
            self.limits[worker_id] = BatchLimits(
                factor=self.settings.watchdog_factor, min_s=self.settings.watchdog_min_seconds
            )
        return self.limits[worker_id]

    def _watch(self) -> None:
        """Every second: a batch running far past its expected time means a hung worker (a stuck kernel, a
        deadlock, SIGSTOP): kill it, so its requests fail at once and a replacement starts."""
        if self._stopping or self._loop is None:
            return
        now = time.monotonic()
        for batch_id, flight in list(self.scheduler.in_flight.items()):
            worker = self.workers.get(flight.worker_id)
            if worker is None or flight.device_released or worker.watchdog_fired:
                continue
            limit = self._limits_of(flight.worker_id).limit_s(flight.job)
            ran = now - flight.started_at
            if ran <= limit:
                continue
            worker.watchdog_fired = True
            worker.failure = f"watchdog: batch {batch_id} ran {ran:.0f} s, over its {limit:.0f} s limit"
            log.error(
                "worker %d (pid %s) is hung: %s; killing it", worker.worker_id, worker.pid, worker.failure
            )
            with contextlib.suppress(ProcessLookupError, OSError):
                worker.process.kill()
            if self.on_watchdog is not None:
                self.on_watchdog()
        self._loop.call_later(WATCHDOG_PERIOD_S, self._watch)

    def _cancel_batch(self, worker_id: int, batch_id: int) -> None:
        worker = self.workers.get(worker_id)
        # A group's ranks must all stop at the same step, which no message can promise: its batches finish.
        if worker is None or worker.state == WorkerState.DEAD or worker.devices:
            return
        worker.outbox.put(CancelBatch(batch_id))

    def _respawn(self, worker_id: int, device: str, failures_in_a_row: int) -> None:
        if self._stopping:
            return
        slot = self.slots[worker_id]
        if len(slot) == 1:
            self._spawn(worker_id, device, failures_in_a_row)
        else:
            self._spawn_group(worker_id, slot, failures_in_a_row)

    def _alive_changed(self) -> None:
        if self.on_alive_changed is not None:
            self.on_alive_changed(self.alive)
