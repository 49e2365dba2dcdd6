"""Stand-in engine workers: worker_main's signature and message protocol, without torch or a model.

Each is a module-level function, so a spawned process can import it. The prompt steers a batch:
`hold:<path>` answers once that file exists (the test decides when the worker is free again), `fail` answers
with an error, `die` exits mid-batch without answering. Each image's bytes say what made it:
`<prompt>|seed=<seed>|batch=<images in the batch>`.

Worker groups have their stand-ins too (`group_worker`, `group_failing_worker`): every rank gets every job; the
leader answers. `die:<rank>` makes that rank exit; the leader then blocks, as it would inside a collective.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from pathlib import Path

from diffuserve.config import Settings
from diffuserve.types import (
    TINY_FLUX,
    BatchJob,
    BatchResult,
    DeviceFree,
    EncodedImage,
    GroupRank,
    Shutdown,
    WorkerFailed,
    WorkerReady,
)

HOLD_LIMIT_S = 30.0  # a test that forgets to release its worker fails instead of hanging
MEDIA_TYPE = "application/octet-stream"  # the bytes are a description, not an image


def fake_worker(worker_id: int, device: str, settings: Settings, conn: Connection) -> None:
    """Ready at once, then one BatchResult per BatchJob (the protocol's original form)."""
    _serve(worker_id, device, settings, conn, device_free=False)


def device_free_worker(worker_id: int, device: str, settings: Settings, conn: Connection) -> None:
    """As fake_worker, but sends DeviceFree before each BatchResult, as a pipelining worker does."""
    _serve(worker_id, device, settings, conn, device_free=True)


def failing_worker(worker_id: int, device: str, settings: Settings, conn: Connection) -> None:
    """Cannot load its model and says so."""
    conn.send(WorkerFailed(worker_id=worker_id, error="OSError: no model at /nowhere"))


def crashing_worker(worker_id: int, device: str, settings: Settings, conn: Connection) -> None:
    """Dies while loading without a word, as a segfault or the OOM killer would leave it."""
    os._exit(3)


def flapping_worker(worker_id: int, device: str, settings: Settings, conn: Connection) -> None:
    """Gets ready, then dies at once: every replacement does the same."""
    conn.send(_ready(worker_id, device, settings))
    os._exit(4)


def _serve(worker_id: int, device: str, settings: Settings, conn: Connection, *, device_free: bool) -> None:
    conn.send(_ready(worker_id, device, settings))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, Shutdown):
            return
        if isinstance(message, BatchJob):
            result = _run(message)
            if device_free:
                conn.send(DeviceFree(batch_id=message.batch_id))
            conn.send(result)


def _run(job: BatchJob) -> BatchResult:
    started = time.perf_counter()
    _die_if_told(job, 0)
    if any(item.prompt.startswith("die:") for item in job.items):
        time.sleep(HOLD_LIMIT_S)  # a peer is gone: stuck, as a rank waiting for it in a collective would be
    for item in job.items:
        if item.prompt == "die":
            os._exit(5)
        if item.prompt.startswith("hold:"):
            _wait_for(Path(item.prompt.removeprefix("hold:")))
    if any(item.prompt == "fail" for item in job.items):
        return BatchResult(batch_id=job.batch_id, error="RuntimeError: the fake engine was told to fail")
    images = [
        [
            EncodedImage(f"{item.prompt}|seed={seed}|batch={job.num_images}".encode(), seed, MEDIA_TYPE)
            for seed in item.seeds
        ]
        for item in job.items
    ]
    elapsed_ms = (time.perf_counter() - started) * 1000
    return BatchResult(batch_id=job.batch_id, images=images, inference_ms=elapsed_ms, denoise_ms=elapsed_ms)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def _ready(worker_id: int, device: str, settings: Settings) -> WorkerReady:
    from diffuserve.engine.engine import model_info

    model = model_info(settings, TINY_FLUX)
    return WorkerReady(worker_id, os.getpid(), device, model, load_seconds=0.0, warmup_seconds=0.0)


def group_worker(worker_id: int, device: str, settings: Settings, conn: Connection, rank: GroupRank) -> None:
    """One rank of a stand-in group: the leader serves as device_free_worker does, followers only listen."""
    if rank.leader:
        _serve(worker_id, device, settings, conn, device_free=True)
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, Shutdown):
            return
        if isinstance(message, BatchJob):
            _die_if_told(message, rank.rank)


def group_failing_worker(
    worker_id: int, device: str, settings: Settings, conn: Connection, rank: GroupRank
) -> None:
    """A group whose last rank cannot load its model; the leader waits for its peers, as at a rendezvous."""
    if rank.rank == rank.world_size - 1:
        conn.send(
            WorkerFailed(worker_id=worker_id, error=f"rank {rank.rank}: RuntimeError: no room on {device}")
        )
        return
    time.sleep(HOLD_LIMIT_S)


def _die_if_told(job: BatchJob, rank: int) -> None:
    if any(item.prompt == f"die:{rank}" for item in job.items):
        os._exit(6)


def group_rendezvous_race_worker(
    worker_id: int, device: str, settings: Settings, conn: Connection, rank: GroupRank
) -> None:
    """A group whose first start fails at the rendezvous (its port was taken), as init_group reports it; the
    started again group serves. The marker file under the settings' cache dir remembers the first start."""
    marker = Path(settings.resolved_cache_dir) / f"rendezvous-{worker_id}"
    if rank.leader and not marker.exists():
        marker.touch()
        conn.send(
            WorkerFailed(
                worker_id=worker_id,
                error=f"rank 0: DistNetworkError: The server socket has failed to listen on port {rank.port}",
                fatal=False,
            )
        )
        return
    group_worker(worker_id, device, settings, conn, rank)
