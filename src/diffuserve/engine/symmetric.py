"""Symmetric-memory exchanges between a group's GPUs (ulysses-p2p, ring-p2p): the per-size cache of their
buffers, which CUDA graphs need kept, and the probe that tells whether the GPUs can share memory at all."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, cast

import torch

log = logging.getLogger(__name__)


class SymmetricExchange(Protocol):
    """An exchange over a symmetric buffer: calls of `dtype` whose tensor has up to `capacity` elements fit it."""

    dtype: torch.dtype
    capacity: int
    buffer: torch.Tensor


ExchangeT = TypeVar("ExchangeT", bound=SymmetricExchange)


class ExchangeCache(Generic[ExchangeT]):
    """This process's exchanges, one per size reached so far; `make(tensor)` sets up one for calls of
    `tensor`'s size (a collective: every rank makes it at the same call). A buffer is never freed while the
    process serves: a captured CUDA graph keeps writing to the addresses it saw at capture. Sizes only grow,
    so the buffers kept are few (a new one only for a call larger than every earlier one)."""

    def __init__(self, name: str, make: Callable[[torch.Tensor], ExchangeT]) -> None:
        self.name = name
        self.make = make
        self.exchanges: list[ExchangeT] = []

    def for_call(self, tensor: torch.Tensor) -> ExchangeT:
        for exchange in self.exchanges:
            if exchange.dtype == tensor.dtype and exchange.capacity >= tensor.numel():
                return exchange
        if torch.cuda.is_current_stream_capturing():
            # The buffer is a collective allocation; the CUDA graph hook then runs this call without a graph.
            raise RuntimeError(
                f"{self.name}: a new exchange buffer cannot be set up inside a CUDA graph capture"
            )
        exchange = self.make(tensor)
        self.exchanges.append(exchange)
        megabytes = exchange.buffer.numel() * exchange.buffer.element_size() / 1e6
        log.info("%s: %.0f MB of symmetric memory for calls of %s", self.name, megabytes, tuple(tensor.shape))
        return exchange


def rendezvous(
    group_name: str, numel: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, Any]:
    """A symmetric buffer of `numel` elements on every rank of the group, and its handle (a collective)."""
    import torch.distributed._symmetric_memory as symm_mem

    buffer = symm_mem.empty(numel, dtype=dtype, device=device)
    # A plain group name: torch 2.13 types it as c10d.GroupName, which older versions lack.
    return buffer, symm_mem.rendezvous(buffer, cast(Any, group_name))


def p2p_available(group: Any, device: str) -> tuple[bool, str]:
    """Whether every rank of `group` can write into the others' memory: a collective set-up of a small
    symmetric buffer, agreed on by all ranks (one rank failing must not leave the others expecting it)."""
    import torch.distributed as dist

    reason = ""
    try:
        _, handle = rendezvous(group.group_name, 1024, torch.bfloat16, torch.device(device))
        handle.barrier(channel=0, timeout_ms=60_000)
        torch.cuda.synchronize(device)
    except Exception as exc:  # no P2P between the GPUs, or a PyTorch build without symmetric memory
        reason = f"{type(exc).__name__}: {exc}"
    failed = torch.tensor([1 if reason else 0], device=device)
    dist.all_reduce(failed, group=group)
    if failed.item():
        return False, reason or "another rank of the group could not set up symmetric memory"
    return True, ""
