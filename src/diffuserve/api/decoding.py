"""Edits' pictures decoded off the event loop, a few requests at a time, and called off when their client
leaves or their deadline passes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from diffuserve.api.deps import wait_for_disconnect
from diffuserve.errors import ClientClosed, DeadlineExceeded

T = TypeVar("T")
# Requests whose pictures are decoded at the same time; the others wait their turn. Each holds one full-size
# picture at a time, so this bounds the memory (and the cores) decoding takes.
DECODE_SLOTS = 2
_slots = asyncio.Semaphore(DECODE_SLOTS)


async def decode_off_loop(request: Request, work: Callable[[threading.Event], T], timeout: float) -> T:
    """`work(stop)` in a thread, in one of the slots. When the client hangs up (499) or `timeout` s pass
    (504), `stop` is set, which ends the decoding at Pillow's next read of the file; the slot is held until the
    thread has ended, so the slots bound the CPU that decoding takes, not only the requests that wait on it."""
    stop = threading.Event()
    async with _slots:
        job = asyncio.ensure_future(asyncio.to_thread(work, stop))
        job.add_done_callback(_read_outcome)
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({job, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if job in done:
                return job.result()
            if gone in done:
                raise ClientClosed("the client closed the connection while its pictures were decoded")
            raise DeadlineExceeded(f"the pictures were not decoded within the request's {timeout:g} s")
        finally:
            gone.cancel()
            stop.set()
            if not job.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(job)  # ends at its next read; a cancellation of ours goes on


def _read_outcome(job: asyncio.Future[Any]) -> None:
    # An outcome nobody awaits (the request left) must not be logged as "never retrieved".
    if not job.cancelled():
        job.exception()
