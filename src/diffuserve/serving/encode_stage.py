"""The worker's encoder stage: a thread that encodes finished batches (and previews) while the device runs on."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Batch = TypeVar("Batch")


class LockedSender:
    """Sends messages to the parent from two threads (the device loop and the encoder stage) without
    interleaving them."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            self._conn.send(message)


class EncodeStage(Generic[Batch]):
    """Encodes batches in arrival order on one thread and sends the messages each gives (a batch's result, a
    step's previews), so a batch's previews always reach the server before its result.

    At most `depth` batches wait for it: a device that outruns its encoders then waits at `submit` instead of
    piling decoded images up in memory.
    """

    def __init__(
        self, encode: Callable[[Batch], list[Any]], send: Callable[[Any], None], depth: int = 2
    ) -> None:
        self._encode = encode
        self._send = send
        self._queue: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="encode-stage", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        self._queue.put(batch)

    def close(self, timeout: float | None = None) -> None:
        """Encode and send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                messages = self._encode(batch)
            except Exception:  # never leave the device loop blocked on a stage that is gone
                log.exception("the encoder stage could not encode a batch's images; it goes on with the next")
                continue
            try:
                for message in messages:
                    self._send(message)
            except (OSError, ValueError):  # the parent went away: nobody is left to answer
                log.warning("could not send a batch's images: the server is gone")
                return
