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
from diffuserve.types import BatchJob, BatchResult, DeviceFree, Shutdown, WorkerFailed, WorkerReady


def worker_main(worker_id: int, device: str, settings: Settings, conn: Connection) -> None:
    """Entry point of the child process (spawned, so no CUDA or thread state is inherited)."""
    entered_at = time.monotonic()
    configure_logging(settings.log_format, settings.log_level, role=f"worker-{worker_id}")
    log = logging.getLogger("diffuserve.worker")
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from diffuserve.engine.engine import Engine

    # Loading bars are for terminals; in a server log they are noise between the structured lines.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Even disabled, diffusers' progress bars create tqdm's multiprocessing lock, a named semaphore that a
    # killed worker can never remove (the resource tracker then warns of a leak). One process needs no more
    # than a thread lock.
    import tqdm

    tqdm.tqdm.set_lock(threading.RLock())

    imported_s = time.monotonic() - entered_at
    engine = Engine(settings, device)
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
        conn.send(WorkerFailed(worker_id=worker_id, error=f"{type(exc).__name__}: {exc}"))
        return
    log.info(
        "worker %d ready on %s (load %.1fs, warm-up %.1fs)", worker_id, device, load_seconds, warmup_seconds
    )
    phases = {"import_s": imported_s, **engine.phases}
    conn.send(
        WorkerReady(worker_id, os.getpid(), device, info, load_seconds, warmup_seconds, entered_at, phases)
    )
    serve_batches(engine, conn, worker_id)


def serve_batches(engine: Any, conn: Connection, worker_id: int) -> None:
    """The device loop: compute a batch, tell the parent the device is free, hand the batch to the encoder
    stage, take the next. Encoding never holds the device up; results may follow DeviceFree by a little.
    A batch whose clients have all gone stops at its next denoising step (CancelBatch)."""
    log = logging.getLogger("diffuserve.worker")
    sender = LockedSender(conn)
    stage: EncodeStage[Any] = EncodeStage(engine.encode, sender.send)
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
        computed = engine.compute(message, cancelled=lambda batch_id=batch_id: inbox.cancelled(batch_id))
        inbox.forget(batch_id)
        if isinstance(computed, BatchResult):  # the batch failed on the device, or was cancelled
            sender.send(computed)
        else:
            sender.send(DeviceFree(batch_id))
            stage.submit(computed)
        if engine.broken:
            log.error(
                "worker %d: the device is unusable after a CUDA error; exiting to be replaced", worker_id
            )
            stage.close()
            return


def _save_compile_cache(settings: Settings) -> None:
    from diffuserve.engine.tiers import save_compile_cache

    # Persists what warm-up compiled (nothing on CPU); a failed write is logged there, never fatal.
    save_compile_cache(settings.resolved_cache_dir)
