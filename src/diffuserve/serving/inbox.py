"""A worker's inbox: the parent's messages read on their own thread, so a cancel reaches a batch mid-run."""

from __future__ import annotations

import collections
import queue
import threading
from multiprocessing.connection import Connection
from typing import Any

from diffuserve.messages import CancelBatch
from diffuserve.types import BatchJob


class Inbox:
    """Jobs and shutdowns queue for the device loop in order; CancelBatch is noted at once, for the running
    batch's step callback to see. `get` returns None once the parent is gone.

    Only the batches this worker holds (received, not yet forgotten) can be cancelled: a CancelBatch that
    crosses its batch's end in the pipe is dropped instead of being remembered for ever."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._messages: queue.Queue[Any] = queue.Queue()
        self._peeked: collections.deque[Any] = collections.deque()  # taken from the queue by `waiting`
        self._held: set[int] = set()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="inbox", daemon=True)
        self._thread.start()

    def get(self) -> Any:
        if self._peeked:
            return self._peeked.popleft()
        return self._messages.get()

    def waiting(self, timeout: float = 0.0) -> bool:
        """Whether a message waits to be taken, or arrives within `timeout` seconds (the worker warms its next
        batch size only when none does). Only the device loop calls `get` and this."""
        if self._peeked or not self._messages.empty():
            return True
        if timeout <= 0:
            return False
        try:
            self._peeked.append(self._messages.get(timeout=timeout))
        except queue.Empty:
            return False
        return True

    def cancelled(self, batch_id: int) -> bool:
        return batch_id in self._cancelled

    def forget(self, batch_id: int) -> None:
        """The batch is done: a cancel for it from now on is stale."""
        with self._lock:
            self._held.discard(batch_id)
            self._cancelled.discard(batch_id)

    def _run(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._messages.put(None)  # the server went away: nothing left to serve
                return
            if isinstance(message, CancelBatch):
                with self._lock:
                    if message.batch_id in self._held:
                        self._cancelled.add(message.batch_id)
                continue
            if isinstance(message, BatchJob):
                with self._lock:
                    self._held.add(message.batch_id)
            self._messages.put(message)
