"""The parent's side of one worker: which devices workers get, and the handle the pool keeps for each."""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any

from diffuserve.messages import CompileCacheSaved, WorkerReady, warm_order
from diffuserve.serving.outbox import Outbox
from diffuserve.serving.worker_group import GroupProcess
from diffuserve.types import BatchJob


def resolve_devices(spec: str) -> list[str]:
    """`auto` → every visible GPU or one CPU; `cpu`; `0,1`; `cuda:0,cuda:1`; `cpu,cpu` (two CPU workers)."""
    spec = spec.strip().lower()
    if spec == "auto":
        if not glob.glob("/dev/nvidia[0-9]*") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            return ["cpu"]  # no NVIDIA device: skip importing torch in the API process
        try:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # a broken CUDA install must not stop a CPU server
            count = 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "cpu" or part.startswith("cuda:"):
            devices.append(part)
        elif part.isdigit():
            devices.append(f"cuda:{part}")
        else:
            raise ValueError(f"--devices: {part!r} is not cpu, a GPU index or cuda:N")
    if not devices:
        raise ValueError("--devices is empty")
    return devices


class WorkerState(str, Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


@dataclass(eq=False)
class WorkerProcess:
    """Parent-side handle of one worker process; implements the scheduler's WorkerSlot."""

    worker_id: int
    device: str
    process: Any
    conn: Connection
    started_at: float
    state: WorkerState = WorkerState.STARTING
    pid: int | None = None
    ready: WorkerReady | None = None
    failure: str | None = None
    # Whether that failure is the model's (starting again cannot help) or a passing one (a group's rendezvous).
    failure_fatal: bool = True
    # Quick failures in a row: the restart back-off grows with them; a worker that ran a while resets them.
    failures_in_a_row: int = 0
    # Times this slot's worker was replaced since the server started: the readiness body's `restarts`.
    replacements: int = 0
    ready_at: float | None = None
    # When its last batch size became warm (the one ready waited for, or a later one warmed between batches).
    warm_at: float | None = None
    watchdog_fired: bool = False
    # Its report of the compile artefacts it saved once every batch size was warm; None until the save.
    compile_cache: CompileCacheSaved | None = field(default=None, init=False)
    # While starting: `spawning` (a fresh interpreter), then the worker's own WorkerPhase and its detail.
    phase: str = "spawning"
    phase_detail: str = ""
    # A worker group's devices, rank 0 (the leader) first; empty for a one-device worker.
    devices: tuple[str, ...] = ()
    outbox: Outbox = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Every message to the worker goes through it; the reader thread only receives.
        self.outbox = Outbox(self.conn, f"worker-{self.worker_id}-sender")

    def send(self, job: BatchJob) -> None:
        self.outbox.put(job)
        self.state = WorkerState.BUSY

    @property
    def warm_sizes(self) -> frozenset[int] | None:
        """The batch sizes this ready worker runs without compiling; None: every size (none is specialised)."""
        if self.ready is None or self.ready.warm_sizes is None:
            return None
        return frozenset(self.ready.phases.warmup_s) | frozenset(self.ready.warm_sizes)

    def size_warm(self, size: int, seconds: float) -> bool:
        """The ready worker warmed one more batch size; whether every size is warm now."""
        if self.ready is None:
            return False
        self.ready.phases.warmup_s[size] = seconds
        if self.cold_sizes():
            return False
        self.warm_at = time.monotonic()
        return True

    def cold_sizes(self) -> list[int]:
        """The batch sizes this ready worker has still to warm, in the order it warms them."""
        warm = self.warm_sizes
        if self.ready is None or warm is None:
            return []
        return [size for size in warm_order(self.ready.model.max_batch) if size not in warm]

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "id": self.worker_id,
            "device": self.device,
            "pid": self.pid,
            "state": self.state.value,
            "restarts": self.replacements,
        }
        if self.state == WorkerState.STARTING:
            described["phase"] = self.phase
            if self.phase_detail:
                described["phase_detail"] = self.phase_detail
        elif cold := self.cold_sizes():
            described["phase"] = f"warming batch size {cold[0]}"
        if self.ready is not None:
            warm = self.warm_sizes
            top = self.ready.model.max_batch
            described["warm_batch_sizes"] = sorted(warm) if warm is not None else list(range(1, top + 1))
        if isinstance(self.process, GroupProcess):
            described["devices"] = list(self.devices)
            described["pids"] = self.process.pids
        if self.ready is not None:
            described["start_seconds"] = self.start_phases()
        if self.compile_cache is not None:  # absent: not saved yet; null: nothing saved
            described["compile_cache"] = self.compile_cache.path
        return described

    def start_phases(self) -> dict[str, float]:
        """Seconds of each start-up phase: spawn (a fresh interpreter and, for CPU workers, torch), then the
        worker's own (import, load, tier, warm-up per batch size, compile-cache save), then ready in total."""
        assert self.ready is not None
        phases = {"spawn": self.ready.entered_at - self.started_at} if self.ready.entered_at else {}
        phases.update(self.ready.phases.named())
        if self.compile_cache is not None:  # saved after ready where sizes warm after it
            phases["compile_cache_save"] = self.compile_cache.seconds
        if self.ready_at is not None:
            phases["total"] = self.ready_at - self.started_at
        if self.warm_at is not None and self.warm_at != self.ready_at:
            phases["all_warm"] = self.warm_at - self.started_at
        return {name: round(value, 2) for name, value in phases.items()}
