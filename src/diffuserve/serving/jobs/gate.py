"""How many of a model's jobs are in its scheduler's queue at once: the rest wait here, highest priority first,
so a backlog of thousands never fills the queue that synchronous requests need."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class PriorityGate:
    """Holders weigh at most `capacity()` together (one heavier alone may enter an empty gate); waiters are let in
    by (priority level, highest first), then arrival."""

    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self._held = 0
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, int, asyncio.Future[None]]] = []

    @asynccontextmanager
    async def slot(self, level: int, ticket: int, weight: int = 1) -> AsyncIterator[None]:
        """Held while the job is in the scheduler; `ticket` (from `next_ticket`) orders it within its level;
        `weight`: what it puts in the scheduler (its images)."""
        await self._acquire(level, ticket, weight)
        try:
            yield
        finally:
            self._held -= weight
            self._wake()

    def position(self, level: int, ticket: int) -> int:
        """How many waiters go before the one with this level and ticket."""
        return sum(1 for entry in self._waiting if (entry[0], entry[1]) < (-level, ticket))

    def next_ticket(self) -> int:
        return next(self._order)

    def _fits(self, weight: int) -> bool:
        return self._held == 0 or self._held + weight <= self._capacity()

    async def _acquire(self, level: int, ticket: int, weight: int) -> None:
        if not self._waiting and self._fits(weight):
            self._held += weight
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (-level, ticket, weight, future)
        heapq.heappush(self._waiting, entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._held -= weight  # let in just as it was cancelled: pass the place on
                self._wake()
            elif entry in self._waiting:  # else _wake already dropped it as cancelled
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def _wake(self) -> None:
        while self._waiting:
            _, _, weight, future = self._waiting[0]
            if future.done():  # its waiter was cancelled
                heapq.heappop(self._waiting)
                continue
            if not self._fits(weight):
                return
            heapq.heappop(self._waiting)
            self._held += weight
            future.set_result(None)
