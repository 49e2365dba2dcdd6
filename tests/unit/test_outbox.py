"""A worker's outbox: messages leave in order from its own thread, a put never waits for the pipe, and a broken
pipe drops the rest without raising."""

from __future__ import annotations

import threading
import time
from typing import Any

from diffuserve.serving.outbox import Outbox


class SlowPipe:
    """Records what it sends and on which thread; each send waits until `opened` is set."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.threads: set[str] = set()
        self.opened = threading.Event()

    def send(self, message: Any) -> None:
        self.opened.wait(5)
        self.threads.add(threading.current_thread().name)
        self.sent.append(message)


class BrokenPipe:
    def __init__(self) -> None:
        self.attempts = 0

    def send(self, message: Any) -> None:
        self.attempts += 1
        raise BrokenPipeError("the worker is gone")


def test_messages_leave_in_order_from_the_outbox_thread_and_put_does_not_wait() -> None:
    pipe = SlowPipe()
    outbox = Outbox(pipe, "worker-0-sender")
    started = time.monotonic()
    for index in range(50):
        outbox.put(index)
    assert time.monotonic() - started < 0.5, "put waited for the pipe"
    assert pipe.sent == []
    pipe.opened.set()
    outbox.close(timeout=5)
    assert pipe.sent == list(range(50))
    assert pipe.threads == {"worker-0-sender"}


def test_a_broken_pipe_drops_the_rest_and_says_why() -> None:
    pipe = BrokenPipe()
    outbox = Outbox(pipe, "worker-1-sender")
    for index in range(3):
        outbox.put(index)
    outbox.close(timeout=5)
    assert pipe.attempts == 1
    assert outbox.broken == "BrokenPipeError: the worker is gone"
