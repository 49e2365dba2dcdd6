"""The body of one worker process: load the engine, report ready, then run batches until told to stop."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

from diffuserve.engine.config import EngineConfig
from diffuserve.engine.prefetch import start_prefetch
from diffuserve.logs import configure_logging
from diffuserve.messages import (
    BatchResult,
    BatchSizeWarm,
    CompileCacheSaved,
    DeviceBatch,
    DeviceFree,
    GroupRank,
    PreviewBatch,
    Shutdown,
    StepProgress,
    WorkerFailed,
    WorkerPhase,
    WorkerReady,
)
from diffuserve.serving.encode_stage import EncodeStage, LockedSender
from diffuserve.serving.image_encoder import BatchEncoder
from diffuserve.serving.inbox import Inbox
from diffuserve.serving.parent_death import die_with_parent
from diffuserve.types import BatchItem, BatchJob

if TYPE_CHECKING:
    from diffuserve.engine.engine import Engine

log = logging.getLogger("diffuserve.worker")

# How long a worker that just got ready waits for batches before it warms its next batch size: the requests
# that queued while it started reach it first, instead of waiting for a warm-up (seconds; a compile without
# artefacts, tens of seconds). Afterwards a warm-up starts whenever no batch waits.
READY_GRACE_S = 1.0

# What makes a worker's engine from its config, device and group place: `load_engine`, or a stand-in in tests.
# It is pickled into the spawned process, so it must be a module-level function or class.
EngineFactory = Callable[[EngineConfig, str, "GroupRank | None"], Any]


def load_engine(config: EngineConfig, device: str, group: GroupRank | None) -> Engine:
    from diffuserve.engine.engine import Engine

    return Engine(config, device, group)


def worker_main(
    worker_id: int,
    device: str,
    config: EngineConfig,
    conn: Connection,
    group: GroupRank | None = None,
    make_engine: EngineFactory = load_engine,
) -> None:
    """Entry point of the child process (spawned, so no CUDA or thread state is inherited). In a worker group
    every rank receives every job from the server and makes the same pipeline call (the denoiser's
    collectives need them all); only the leader (rank 0) answers."""
    entered_at = time.monotonic()
    role = f"worker-{worker_id}" if group is None else f"worker-{worker_id}.{group.rank}"
    configure_logging(config.log_format, config.log_level, role=role)
    if config.weights != "random" and (group is None or group.leader):
        # Before the imports: a cold start's disk reads run beside them (one reader per host is enough).
        start_prefetch(config.model_path or config.model_repo)
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine, later = _start_engine(worker_id, device, config, conn, entered_at, group, make_engine)
    if engine is None:
        return
    if group is None or group.leader:
        serve_batches(engine, conn, worker_id, group, warm_next=later)
    else:
        follow_batches(engine, conn, worker_id, group)
    if engine.broken and group is not None:
        # Peers may be stuck in a collective with this rank: no goodbye to them, the server kills the group.
        os._exit(1)
    engine.close()


def _start_engine(
    worker_id: int,
    device: str,
    config: EngineConfig,
    conn: Connection,
    entered_at: float,
    group: GroupRank | None,
    make_engine: EngineFactory,
) -> tuple[Any, list[int]]:
    """Load and warm the first batch size; the worker (or a group's leader) then reports ready. Returns the
    engine, None when it could not start (after telling the server why), and the batch sizes left to warm."""
    from diffuserve.engine.parallel.group import GroupJoinFailed

    try:
        conn.send(WorkerPhase(worker_id, "importing", "the engine"))
        check_device(device)
        read_weights_early(config, device)
        engine = make_engine(config, device, group)
        # torch and the engine's modules, imported by the calls above: the start of the import phase.
        imported_s = time.monotonic() - entered_at
        engine.on_phase = _phase_reporter(conn, worker_id)
        info = engine.load()
        engine.phases.import_s += imported_s
        sizes = engine.warmup_sizes() if config.warmup else []
        # A worker warms its other batch sizes between batches once it is ready; a group's ranks must run
        # every call together, so a group warms them all first.
        later = sizes[1:] if group is None and engine.sizes_specialised else []
        first = []
        for size in sizes[: len(sizes) - len(later)]:
            engine.on_phase("warming", f"batch size {size}")
            first.append(engine.warm(size))
        if first and first[0] is not None:  # every format once, so no request waits for an encoder to load
            BatchEncoder().encode_batch(every_format(first[0]))
        if not later:
            _save_compile_cache(engine, conn.send if group is None or group.leader else None, worker_id)
    except Exception as exc:
        # The server logs why, in one line, and stops; the traceback is for debugging a bug, not for operators.
        log.debug("worker %d could not start", worker_id, exc_info=True)
        where = f"rank {group.rank}: " if group is not None else ""
        # A rank that could not meet its peers is not the model's fault: the port the server picked may have
        # been taken before rank 0 bound it, or a peer went; the server starts the group again (a few times).
        fatal = not isinstance(exc, GroupJoinFailed)
        conn.send(WorkerFailed(worker_id, f"{where}{type(exc).__name__}: {exc}", fatal=fatal))
        return None, []
    if group is None or group.leader:
        phases = engine.phases
        warmup_s = sum(phases.warmup_s.values())
        log.info(
            "worker %d ready on %s (load %.1fs, warm-up %.1fs%s)", worker_id, device, phases.load_s, warmup_s,
            f"; batch sizes {', '.join(map(str, later))} warm next" if later else "",
        )  # fmt: skip
        warm = tuple(sizes[:1]) if later else None
        conn.send(WorkerReady(worker_id, os.getpid(), device, info, entered_at, phases, warm_sizes=warm))
    return engine, later


def _phase_reporter(conn: Connection, worker_id: int) -> Callable[[str, str], None]:
    """What the engine calls as it enters each start-up phase: logged, and told to the server's readiness."""

    def report(phase: str, detail: str) -> None:
        log.info("worker %d: %s%s", worker_id, phase, f" ({detail})" if detail else "")
        conn.send(WorkerPhase(worker_id, phase, detail))

    return report


def every_format(batch: DeviceBatch) -> DeviceBatch:
    """The warm-up's first image once in every output format, for the encoder stage's first run."""
    formats = ("webp", "png", "jpeg")
    items = [BatchItem("warmup", "warm-up", None, [0], fmt, None) for fmt in formats]
    job = replace(batch.job, items=items)
    pixels = np.repeat(batch.pixels[:1], len(formats), axis=0)
    return DeviceBatch(job, pixels, batch.denoise_ms, batch.decode_ms)


def read_weights_early(config: EngineConfig, device: str) -> None:
    """On a GPU, start reading a local folder's diffusers models onto it now that torch is imported, so the read
    runs beside the engine's imports (diffusers, transformers: seconds) and the load takes the tensors read."""
    if not device.startswith("cuda") or config.weights == "random":
        return
    from diffuserve.engine.early_read import start_early_read
    from diffuserve.engine.loader import resolve_dtype

    start_early_read(config.model_path or config.model_repo, device, resolve_dtype(config.dtype, device))


class NoDevice(RuntimeError):
    """The worker's device does not exist here (a CUDA device asked of a CPU-only machine or torch build)."""


def check_device(device: str) -> None:
    """Fail in one line, before any model is loaded, when `device` is a GPU this process cannot use."""
    if not device.startswith("cuda"):
        return
    import torch

    if torch.version.cuda is None:
        raise NoDevice(f"{device} asked for, but torch {torch.__version__} is a CPU build; use DEVICES=cpu")
    if not torch.cuda.is_available():
        raise NoDevice(f"{device} asked for, but torch sees no CUDA device here; use DEVICES=cpu")
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        raise NoDevice(f"{device} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")


def serve_batches(
    engine: Any,
    conn: Connection,
    worker_id: int,
    group: GroupRank | None = None,
    warm_next: Sequence[int] = (),
) -> None:
    """The device loop: compute a batch, tell the parent the device is free, hand the batch to the encoder
    stage, take the next. Encoding never holds the device up; results may follow DeviceFree by a little.
    A batch whose clients have all gone stops at its next denoising step (CancelBatch), except in a group,
    whose ranks must all stop at the same step. While nothing waits, the batch sizes of `warm_next` are warmed
    one at a time, each announced (BatchSizeWarm); the compile cache is saved after the last.

    A group's leader answers a failed batch by leaving instead: the batch fails with its error when the server
    tears the group down, and no other batch is handed to a group that is going away."""
    sender = LockedSender(conn)
    encoder = BatchEncoder()
    stage: EncodeStage[Any] = EncodeStage(lambda batch: _encode(encoder, batch), sender.send)
    inbox = Inbox(conn)
    cold, grace = list(warm_next), READY_GRACE_S
    while True:
        if cold and not inbox.waiting(grace):
            grace = 0.0
            if not _warm_next(engine, sender, worker_id, cold):
                stage.close()
                return
            continue
        grace = 0.0
        message = inbox.get()
        if message is None:
            return  # the server went away: nothing left to serve
        if isinstance(message, Shutdown):
            stage.close()  # finish and send what is being encoded: those clients are waiting
            return
        if not isinstance(message, BatchJob):
            continue
        batch_id = message.batch_id
        cancelled = None if group is not None else (lambda batch_id=batch_id: inbox.cancelled(batch_id))
        on_step = _step_reporter(sender, message) if message.reports_progress else None
        computed = engine.compute(message, cancelled=cancelled, on_preview=stage.submit, on_step=on_step)
        inbox.forget(batch_id)
        if isinstance(computed, BatchResult) and group is not None:
            stage.close()
            sender.send(_rank_failed(worker_id, group, computed))
            return
        if isinstance(computed, BatchResult):  # the batch failed on the device, or was cancelled
            sender.send(computed)
        else:
            sender.send(DeviceFree(batch_id))
            stage.submit(computed)
        if engine.broken:
            log.error(
                "worker %d: the device (or its group) is unusable after a failed batch; exiting to be replaced",
                worker_id,
            )
            stage.close()
            return


def _warm_next(engine: Any, sender: LockedSender, worker_id: int, cold: list[int]) -> bool:
    """Warm the next batch size of `cold` (removed from it) and announce it; after the last, save the compile
    cache. False when the warm-up failed: the device may be unusable, so the worker exits to be replaced."""
    size = cold.pop(0)
    try:
        engine.warm(size)
    except Exception as exc:
        log.exception("worker %d: warm-up of batch size %d failed; exiting to be replaced", worker_id, size)
        error = f"warm-up of batch size {size} failed: {type(exc).__name__}: {exc}"
        sender.send(WorkerFailed(worker_id, error, fatal=False))
        return False
    seconds = engine.phases.warmup_s.get(size, 0.0)
    log.info("worker %d: batch size %d warm (%.1fs)", worker_id, size, seconds)
    sender.send(BatchSizeWarm(worker_id, size, seconds))
    if not cold:
        _save_compile_cache(engine, sender.send, worker_id)
    return True


def _save_compile_cache(engine: Any, send: Callable[[Any], None] | None, worker_id: int) -> None:
    """Save what warm-up compiled and tell the server where (`send`: None on a group's follower), so readiness
    can say that a start from this cache dir will load the artefacts."""
    path = engine.save_compile_cache()
    if send is not None:
        send(CompileCacheSaved(worker_id, path, engine.phases.compile_cache_save_s))


def _step_reporter(sender: LockedSender, job: BatchJob) -> Callable[[int], None]:
    steps = job.denoising_steps
    return lambda step: sender.send(StepProgress(job.batch_id, min(step, steps), steps))


def _encode(encoder: BatchEncoder, batch: Any) -> list[Any]:
    """The encoder stage's work: a step's previews (PreviewBatch) or a finished batch (DeviceBatch)."""
    if isinstance(batch, PreviewBatch):
        return list(encoder.encode_previews(batch))
    return [encoder.encode_batch(batch)]


def follow_batches(engine: Any, conn: Connection, worker_id: int, group: GroupRank) -> None:
    """A group follower's loop: the same pipeline call as the leader for every job, whose images are the
    leader's to send; this rank only does its share of the denoiser's work."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, Shutdown):
            return
        if isinstance(message, BatchJob):
            computed = engine.compute(message)
            if isinstance(computed, BatchResult):
                conn.send(_rank_failed(worker_id, group, computed))
                return


def _rank_failed(worker_id: int, group: GroupRank, result: BatchResult) -> WorkerFailed:
    return WorkerFailed(worker_id=worker_id, error=f"rank {group.rank}: {result.error}", fatal=False)


def child_entry(
    worker_id: int,
    device: str,
    config: EngineConfig,
    conn: Connection,
    cpu_threads: int | None,
    group: GroupRank | None,
    make_engine: EngineFactory,
) -> None:
    """What a spawned worker process runs first: tie its life to the server's, size torch's CPU threads, then
    `worker_main`."""
    # A sharded checkpoint's files are read by several threads at once (diffusers reads the flag at import,
    # which has not happened yet in this fresh process); an operator's own setting wins.
    os.environ.setdefault("HF_ENABLE_PARALLEL_LOADING", "yes")
    parent = mp.parent_process()
    if parent is not None and parent.pid is not None:
        # First of all: a server killed outright (OOM killer, kill -9) runs no cleanup, and a worker left
        # behind would keep its GPU memory from the server that replaces it.
        die_with_parent(parent.pid)
    if cpu_threads is not None:
        # Idle OpenMP threads would otherwise spin for a while after each op and take the cores the API
        # process needs to answer; measured: about half the per-request overhead on 2 cores. Set before
        # torch (and its OpenMP runtime) is imported; an operator's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        torch.set_num_threads(cpu_threads)
    worker_main(worker_id, device, config, conn, group, make_engine)
