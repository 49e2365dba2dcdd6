"""How many of a model's jobs are in its scheduler's queue at once: the rest wait here, highest priority first,
so a backlog of thousands never fills the queue that synchronous requests need."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class PriorityGate:
    """At most `capacity()` holders; waiters are let in by (priority level, highest first), then arrival."""

    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self._held = 0
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []

    @asynccontextmanager
    async def slot(self, level: int, ticket: int) -> AsyncIterator[None]:
        """Held while the job is in the scheduler; `ticket` (from `next_ticket`) orders it within its level."""
        await self._acquire(level, ticket)
        try:
            yield
        finally:
            self._held -= 1
            self._wake()

    def position(self, level: int, ticket: int) -> int:
        """How many waiters go before the one with this level and ticket."""
        return sum(1 for entry in self._waiting if (entry[0], entry[1]) < (-level, ticket))

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, future in self._waiting if not future.done())

    def next_ticket(self) -> int:
        return next(self._order)

    async def _acquire(self, level: int, ticket: int) -> None:
        if self._held < self._capacity() and not self._waiting:
            self._held += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (-level, ticket, future)
        heapq.heappush(self._waiting, entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._held -= 1  # let in just as it was cancelled: pass the place on
                self._wake()
            else:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def _wake(self) -> None:
        while self._waiting and self._held < self._capacity():
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                self._held += 1
                future.set_result(None)
