"""Graceful drain: after SIGTERM the server takes no new generations, lets running ones finish up to a
timeout, then fails the rest with 503 so every client gets an answer before the process exits."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from diffuserve.errors import ShuttingDown

log = logging.getLogger(__name__)
T = TypeVar("T")


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self._running: set[asyncio.Future[Any]] = set()
        self._abort: asyncio.Event | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down and takes no new requests; retry on another replica"
            )

    async def run(self, work: Awaitable[T]) -> T:
        """Await `work`, unless the drain times out first: then `work` is cancelled and ShuttingDown raised."""
        if self.draining:
            if inspect.iscoroutine(work):
                work.close()  # never started: close it so it is not reported as never awaited
            self.refuse_if_draining()
        task: asyncio.Future[T] = asyncio.ensure_future(work)
        abort = self._abort_event()
        aborted: asyncio.Future[Any] = asyncio.ensure_future(abort.wait())
        self._running.add(task)
        try:
            await asyncio.wait([task, aborted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._running.discard(task)
            aborted.cancel()
            if not task.done():
                task.cancel()  # our own cancellation, or the drain's: the work must not outlive its request
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            elif not task.cancelled():
                # Done as we were cancelled (a hang-up seen by both): its outcome goes unread, so mark it read,
                # or asyncio logs "Task exception was never retrieved" with a traceback.
                task.exception()
        if task.cancelled():
            raise ShuttingDown("the server shut down before this request finished")
        return task.result()

    async def drain(self, timeout: float) -> int:
        """Stop taking work, wait up to `timeout` s for what runs, then fail the rest. Returns how many failed."""
        self.draining = True
        running = set(self._running)
        log.info("draining: %d generation(s) in flight, waiting up to %g s", len(running), timeout)
        if running:
            await asyncio.wait(running, timeout=timeout)
        left = len(self._running)
        if left:
            log.warning("drain timeout of %g s passed: failing %d generation(s) with 503", timeout, left)
        self._abort_event().set()
        # Let each failed request's handler send its answer before the server closes connections.
        for _ in range(3):
            await asyncio.sleep(0)
        return left

    def _abort_event(self) -> asyncio.Event:
        # Created on first use so it belongs to the running loop, not to whichever loop built the app.
        if self._abort is None:
            self._abort = asyncio.Event()
        return self._abort
