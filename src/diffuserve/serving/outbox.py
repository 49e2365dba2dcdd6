"""The messages to one worker, sent in order from a thread of their own: pickling a batch (an edit's pictures
are megabytes) and writing it down the pipe never holds the event loop."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Protocol

log = logging.getLogger(__name__)

_CLOSE = object()


class Sender(Protocol):
    def send(self, message: Any) -> None: ...


class Outbox:
    """A queue and a thread per worker. Order is kept (a CancelBatch never overtakes its batch). A send that
    fails means the worker is gone or going: the rest is dropped, and the pool's reader of that worker, which
    sees its pipe close, fails the batch it held."""

    def __init__(self, conn: Sender, name: str) -> None:
        self._conn = conn
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.broken: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued, then stop the thread; `timeout` waits for that (None: do not wait)."""
        self._queue.put(_CLOSE)
        if timeout is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (message := self._queue.get()) is not _CLOSE:
            if self.broken is not None:
                continue
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:  # ValueError: the pipe was closed on this side
                self.broken = f"{type(exc).__name__}: {exc}"
                log.warning("%s: could not send %s (%s)", self._name, type(message).__name__, self.broken)
