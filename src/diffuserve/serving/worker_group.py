"""Worker groups: one process per device running one pipeline together, which the pool handles as one worker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from diffuserve.messages import GroupRank

# How long a rank waits in a collective for a hung peer before it fails (and its group is replaced). Long
# enough for the ranks of a cold start to compile the same graphs at slightly different speeds.
COLLECTIVE_TIMEOUT_S = 300.0


def plan_groups(devices: list[str], parallel: int) -> list[tuple[str, ...]]:
    """DEVICES cut into consecutive groups of PARALLEL devices: `0,1,2,3` with 2 → (0,1), (2,3)."""
    if parallel < 1:
        raise ValueError(f"PARALLEL (--parallel) must be at least 1, got {parallel}")
    if len(devices) % parallel:
        raise ValueError(
            f"PARALLEL={parallel} needs a multiple of {parallel} devices, but DEVICES gives {len(devices)} "
            f"({','.join(devices)})"
        )
    groups = [tuple(devices[i : i + parallel]) for i in range(0, len(devices), parallel)]
    if parallel > 1:
        for group in groups:
            gpus = [d for d in group if d != "cpu"]
            if gpus and len(gpus) != len(group):
                raise ValueError(f"a worker group mixes CPU and GPU devices ({','.join(group)})")
            if len(set(gpus)) != len(gpus):
                # NCCL cannot run two ranks of one communicator on one GPU.
                raise ValueError(f"a worker group names one GPU twice ({','.join(group)})")
    return groups


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GroupConnection:
    """The pool's pipe to a group: every message (jobs, shutdown) goes to every rank."""

    def __init__(self, conns: list[Connection]) -> None:
        self.conns = conns

    def send(self, message: Any) -> None:
        for conn in self.conns:
            conn.send(message)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


class GroupProcess:
    """The processes of a group behind the one-process interface the pool uses (join, kill, exit code)."""

    def __init__(self, processes: list[Any], devices: tuple[str, ...]) -> None:
        self.processes = processes
        self.devices = devices
        self._lock = threading.Lock()
        self._first_down: int | None = None
        self._first_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self.processes[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self.processes]

    @property
    def exitcode(self) -> int | None:
        return self._first_code if self._first_down is not None else self.processes[0].exitcode

    def is_alive(self) -> bool:
        return any(p.is_alive() for p in self.processes)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for process in self.processes:
            process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()

    def rank_down(self, rank: int) -> bool:
        """Record that a rank's pipe closed; True for the first rank of the group to go (the cause)."""
        with self._lock:
            if self._first_down is not None:
                return False
            self._first_down = rank
            self._first_code = self.processes[rank].exitcode
            return True

    def exit_reason(self) -> str:
        rank = self._first_down if self._first_down is not None else 0
        process = self.processes[rank]
        return (
            f"rank {rank} of the group ({self.devices[rank]}, pid {process.pid}) exited with code "
            f"{self.exitcode}; the group's other ranks were stopped"
        )


def start_ranks(
    ctx: Any,
    devices: tuple[str, ...],
    args_for: Callable[[GroupRank, str, Connection], tuple[Any, ...]],
    *,
    entry: Callable[..., None],
    name: str,
) -> tuple[GroupProcess, GroupConnection]:
    """One process per device, started together; they meet on a fresh port (rank 0 listens on it)."""
    port = free_port()
    processes, conns = [], []
    for index, device in enumerate(devices):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        rank = GroupRank(rank=index, devices=devices, port=port, timeout_s=COLLECTIVE_TIMEOUT_S)
        process = ctx.Process(
            target=entry, args=args_for(rank, device, child_conn), name=f"{name}.{index}", daemon=True
        )
        process.start()
        child_conn.close()  # so the parent sees EOF as soon as the rank dies
        processes.append(process)
        conns.append(parent_conn)
    return GroupProcess(processes, devices), GroupConnection(conns)


def exit_reason(process: Any) -> str:
    if isinstance(process, GroupProcess):
        return process.exit_reason()
    return f"worker process exited with code {process.exitcode}"
