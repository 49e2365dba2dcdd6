"""A worker group's process group: every rank joins it before loading, and leaves it when the worker stops."""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

from diffuserve.messages import GroupRank


class GroupJoinFailed(RuntimeError):
    """This rank could not meet its peers (the rendezvous port was taken, or a peer went): a passing failure,
    after which the server starts the group again rather than giving up on the model."""


def join_group(rank: GroupRank, device: str) -> None:
    """NCCL between GPUs, gloo between CPU processes. Every collective gives up after `rank.timeout_s`, so a
    hung peer ends in an error (and this rank's exit), never a silent hang."""
    import torch
    import torch.distributed as dist

    kwargs: dict[str, Any] = {}
    if device.startswith("cuda"):
        # Binds the communicator to this rank's GPU at once instead of guessing it from the rank.
        kwargs["device_id"] = torch.device(device)
    try:
        dist.init_process_group(
            backend="nccl" if device.startswith("cuda") else "gloo",
            init_method=f"tcp://127.0.0.1:{rank.port}",
            rank=rank.rank,
            world_size=rank.world_size,
            timeout=datetime.timedelta(seconds=rank.timeout_s),
            **kwargs,
        )
    except Exception as exc:
        raise GroupJoinFailed(
            f"rank {rank.rank} could not join its group: {type(exc).__name__}: {exc}"
        ) from exc


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer already gone must not turn a clean exit into a crash
            dist.destroy_process_group()
