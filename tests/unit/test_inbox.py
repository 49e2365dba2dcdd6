"""The worker's inbox: jobs in order, a cancel seen at once, and a cancel that comes after its batch ended
dropped rather than kept."""

from __future__ import annotations

import time
from multiprocessing import Pipe

from diffuserve.messages import CancelBatch, Shutdown
from diffuserve.serving.inbox import Inbox
from diffuserve.types import BatchJob


def job(batch_id: int) -> BatchJob:
    return BatchJob(batch_id, 32, 32, 4, 0.0, [])


def wait_until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


def test_jobs_come_in_order_and_a_cancel_is_seen_mid_batch() -> None:
    parent, child = Pipe()
    inbox = Inbox(child)
    parent.send(job(1))
    parent.send(job(2))
    assert inbox.get().batch_id == 1
    parent.send(CancelBatch(1))
    wait_until(lambda: inbox.cancelled(1))
    assert not inbox.cancelled(2)
    inbox.forget(1)
    assert not inbox.cancelled(1)
    assert inbox.get().batch_id == 2
    parent.send(Shutdown())
    assert isinstance(inbox.get(), Shutdown)


def test_a_cancel_after_its_batch_ended_is_dropped() -> None:
    parent, child = Pipe()
    inbox = Inbox(child)
    parent.send(job(5))
    assert inbox.get().batch_id == 5
    inbox.forget(5)  # the batch finished before the cancel crossed it in the pipe
    parent.send(CancelBatch(5))
    parent.send(CancelBatch(99))  # never held here
    parent.send(job(6))
    assert inbox.get().batch_id == 6
    assert not inbox._cancelled
    parent.close()
    assert inbox.get() is None
