"""The body of one worker process: load the engine, report ready, then run batches until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from diffuserve.config import Settings
from diffuserve.logs import configure_logging
from diffuserve.serving.encode_stage import EncodeStage, LockedSender
from diffuserve.serving.inbox import Inbox
from diffuserve.types import (
    BatchJob,
    BatchResult,
    DeviceFree,
    GroupRank,
    Shutdown,
    WorkerFailed,
    WorkerReady,
)


def worker_main(worker_id: int, device: str, settings: Settings, conn: Connection) -> None:
    """Entry point of the child process (spawned, so no CUDA or thread state is inherited)."""
    entered_at = time.monotonic()
    _prepare(device, settings, role=f"worker-{worker_id}")
    engine = _start_engine(worker_id, device, settings, conn, entered_at)
    if engine is not None:
        serve_batches(engine, conn, worker_id)


def group_worker_main(
    worker_id: int, device: str, settings: Settings, conn: Connection, rank: GroupRank
) -> None:
    """Entry point of one rank of a worker group. Every rank receives every job from the server and makes
    the same pipeline call (the denoiser's collectives need them all); only the leader (rank 0) answers."""
    entered_at = time.monotonic()
    log = _prepare(device, settings, role=f"worker-{worker_id}.{rank.rank}")
    from diffuserve.engine.parallel import close_group, init_group

    try:
        init_group(rank, device)
    except Exception as exc:
        log.exception("worker %d rank %d could not join its group", worker_id, rank.rank)
        # Not the model's fault: the port the server picked may have been taken before rank 0 bound it, or a
        # peer went; the server starts the group again (a few times) rather than giving up.
        error = f"rank {rank.rank}: {type(exc).__name__}: {exc}"
        conn.send(WorkerFailed(worker_id=worker_id, error=error, fatal=False))
        return
    engine = _start_engine(worker_id, device, settings, conn, entered_at, rank)
    if engine is None:
        return
    if rank.leader:
        serve_batches(engine, conn, worker_id, rank)
    else:
        follow_batches(engine, conn, worker_id, rank)
    if engine.broken:
        # Peers may be stuck in a collective with this rank: no goodbye to them, the server kills the group.
        os._exit(1)
    engine.close()
    close_group()


def _prepare(device: str, settings: Settings, role: str) -> logging.Logger:
    configure_logging(settings.log_format, settings.log_level, role=role)
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars are for terminals; in a server log they are noise between the structured lines.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Even disabled, diffusers' progress bars create tqdm's multiprocessing lock, a named semaphore that a
    # killed worker can never remove (the resource tracker then warns of a leak). One process needs no more
    # than a thread lock.
    import tqdm

    tqdm.tqdm.set_lock(threading.RLock())
    return logging.getLogger("diffuserve.worker")


def _start_engine(
    worker_id: int,
    device: str,
    settings: Settings,
    conn: Connection,
    entered_at: float,
    rank: GroupRank | None = None,
) -> Any:
    """Load and warm up; the worker (or a group's leader) then reports ready. None when it could not start,
    after telling the server why."""
    from diffuserve.engine.engine import Engine

    log = logging.getLogger("diffuserve.worker")
    imported_s = time.monotonic() - entered_at
    engine = Engine(settings, device, rank)
    try:
        started = time.perf_counter()
        info = engine.load()
        load_seconds = time.perf_counter() - started
        warmup_seconds = engine.warmup() if settings.warmup else 0.0
        started = time.perf_counter()
        _save_compile_cache(settings)
        engine.phases["compile_cache_save_s"] = time.perf_counter() - started
    except Exception as exc:
        log.exception("worker %d could not start", worker_id)
        where = f"rank {rank.rank}: " if rank is not None else ""
        conn.send(WorkerFailed(worker_id=worker_id, error=f"{where}{type(exc).__name__}: {exc}"))
        return None
    if rank is not None and not rank.leader:
        return engine
    log.info(
        "worker %d ready on %s (load %.1fs, warm-up %.1fs)", worker_id, device, load_seconds, warmup_seconds
    )
    phases = {"import_s": imported_s, **engine.phases}
    conn.send(
        WorkerReady(worker_id, os.getpid(), device, info, load_seconds, warmup_seconds, entered_at, phases)
    )
    return engine


def serve_batches(engine: Any, conn: Connection, worker_id: int, rank: GroupRank | None = None) -> None:
    """The device loop: compute a batch, tell the parent the device is free, hand the batch to the encoder
    stage, take the next. Encoding never holds the device up; results may follow DeviceFree by a little.
    A batch whose clients have all gone stops at its next denoising step (CancelBatch), except in a group,
    whose ranks must all stop at the same step.

    A group's leader answers a failed batch by leaving instead: the batch fails with its error when the server
    tears the group down, and no other batch is handed to a group that is going away."""
    log = logging.getLogger("diffuserve.worker")
    sender = LockedSender(conn)
    stage: EncodeStage[Any] = EncodeStage(lambda batch: _encode(engine, batch), sender.send)
    inbox = Inbox(conn)
    while True:
        message = inbox.get()
        if message is None:
            return  # the server went away: nothing left to serve
        if isinstance(message, Shutdown):
            stage.close()  # finish and send what is being encoded: those clients are waiting
            return
        if not isinstance(message, BatchJob):
            continue
        batch_id = message.batch_id
        cancelled = None if rank is not None else (lambda batch_id=batch_id: inbox.cancelled(batch_id))
        computed = engine.compute(message, cancelled=cancelled, on_preview=stage.submit)
        inbox.forget(batch_id)
        if isinstance(computed, BatchResult) and rank is not None:
            stage.close()
            sender.send(_rank_failed(worker_id, rank, computed))
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


def _encode(engine: Any, batch: Any) -> list[Any]:
    """The encoder stage's work: a step's previews (PreviewBatch) or a finished batch (DeviceBatch)."""
    from diffuserve.engine.previews import PreviewBatch

    if isinstance(batch, PreviewBatch):
        return list(engine.encode_previews(batch))
    return [engine.encode(batch)]


def follow_batches(engine: Any, conn: Connection, worker_id: int, rank: GroupRank) -> None:
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
                conn.send(_rank_failed(worker_id, rank, computed))
                return


def _rank_failed(worker_id: int, rank: GroupRank, result: BatchResult) -> WorkerFailed:
    return WorkerFailed(worker_id=worker_id, error=f"rank {rank.rank}: {result.error}", fatal=False)


def _save_compile_cache(settings: Settings) -> None:
    from diffuserve.engine.tiers import save_compile_cache

    # Persists what warm-up compiled (nothing on CPU); a failed write is logged there, never fatal.
    save_compile_cache(settings.resolved_cache_dir)
