"""How many of a model's jobs are in its scheduler's queue at once: the rest wait here, highest priority first
(raised by their wait, as in the scheduler), so a backlog of thousands never fills the queue that synchronous
requests need."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from diffuserve.serving.priorities import PriorityRules
from diffuserve.types import Priority


@dataclass(eq=False)
class _Waiter:
    priority: Priority
    ticket: int
    weight: int
    enqueued_at: float
    future: asyncio.Future[None] = field(repr=False)


class PriorityGate:
    """Holders weigh at most `capacity()` together (one heavier alone may enter an empty gate). Waiters are let
    in by class, highest first, raised by their wait as `rules` age queued requests (none by default), then by
    arrival (ticket)."""

    def __init__(
        self,
        capacity: Callable[[], int],
        rules: PriorityRules | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = capacity
        self._rules = rules or PriorityRules(aging_s=0.0)
        self._clock = clock
        self._held = 0
        self._order = itertools.count()
        self._waiting: list[_Waiter] = []

    @asynccontextmanager
    async def slot(self, priority: Priority, ticket: int, weight: int = 1) -> AsyncIterator[None]:
        """Held while the job is in the scheduler; `ticket` (from `next_ticket`) orders it within its class;
        `weight`: what it puts in the scheduler (its images)."""
        await self._acquire(priority, ticket, weight)
        try:
            yield
        finally:
            self._held -= weight
            self._wake()

    def next_ticket(self) -> int:
        return next(self._order)

    def position(self, priority: Priority, ticket: int) -> int:
        """How many waiters go before the one with this ticket (a waiter not yet in the gate: its class)."""
        now = self._clock()
        mine = next((w for w in self._waiting if w.ticket == ticket), None)
        key = self._key(mine, now) if mine is not None else (-priority.level, ticket)
        return sum(1 for w in self._waiting if w is not mine and self._key(w, now) < key)

    def _key(self, waiter: _Waiter, now: float) -> tuple[int, int]:
        return (-self._rules.level(waiter, now), waiter.ticket)

    def _fits(self, weight: int) -> bool:
        return self._held == 0 or self._held + weight <= self._capacity()

    async def _acquire(self, priority: Priority, ticket: int, weight: int) -> None:
        if not self._waiting and self._fits(weight):
            self._held += weight
            return
        waiter = _Waiter(priority, ticket, weight, self._clock(), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._held -= weight  # let in just as it was cancelled: pass the place on
                self._wake()
            elif waiter in self._waiting:  # else _wake already dropped it as cancelled
                self._waiting.remove(waiter)
            raise

    def _wake(self) -> None:
        self._waiting = [w for w in self._waiting if not w.future.done()]  # cancelled waiters
        now = self._clock()
        while self._waiting:
            first = min(self._waiting, key=lambda w: self._key(w, now))
            if not self._fits(first.weight):
                return
            self._waiting.remove(first)
            self._held += first.weight
            first.future.set_result(None)
