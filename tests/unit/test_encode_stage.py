"""The worker's encoder stage: results in order, a bounded backlog, a flush on close, send times stamped."""

from __future__ import annotations

import threading
import time
from multiprocessing import Pipe
from typing import Any

from diffuserve.messages import BatchResult, DeviceFree
from diffuserve.serving.encode_stage import EncodeStage, LockedSender


def test_batches_are_encoded_and_sent_in_order_and_close_flushes() -> None:
    sent: list[Any] = []

    def encode(batch_id: int) -> list[Any]:
        time.sleep(0.01 * (3 - batch_id))  # later batches are quicker: order must still hold
        # A batch may give several messages (previews, then its result): they are sent in that order.
        return [DeviceFree(batch_id), BatchResult(batch_id=batch_id)]

    stage: EncodeStage[int] = EncodeStage(encode, sent.append, depth=4)
    for batch_id in range(3):
        stage.submit(batch_id)
    stage.close(timeout=5)
    assert [(type(m).__name__, m.batch_id) for m in sent] == [
        (kind, batch_id) for batch_id in range(3) for kind in ("DeviceFree", "BatchResult")
    ]


def test_submit_waits_when_the_backlog_is_full() -> None:
    release = threading.Event()

    def encode(batch_id: int) -> list[BatchResult]:
        release.wait(5)
        return [BatchResult(batch_id=batch_id)]

    stage: EncodeStage[int] = EncodeStage(encode, lambda _m: None, depth=1)
    stage.submit(0)  # taken by the thread, which blocks in encode
    time.sleep(0.05)
    stage.submit(1)  # fills the backlog of 1
    blocked = threading.Thread(target=stage.submit, args=(2,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive(), "a third batch must wait for the encoder"
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    stage.close(timeout=5)


def test_locked_sender_keeps_messages_whole() -> None:
    parent, child = Pipe()
    sender = LockedSender(child)
    threads = [
        threading.Thread(target=lambda i=i: [sender.send(BatchResult(batch_id=i)) for _ in range(50)])
        for i in range(4)
    ] + [threading.Thread(target=lambda: [sender.send(DeviceFree(9)) for _ in range(50)])]
    for thread in threads:
        thread.start()
    received = [parent.recv() for _ in range(250)]
    for thread in threads:
        thread.join()
    results = [m for m in received if isinstance(m, BatchResult)]
    assert len(results) == 200 and sum(isinstance(m, DeviceFree) for m in received) == 50


def test_an_encoder_failure_does_not_stop_the_stage() -> None:
    sent: list[Any] = []

    def encode(batch_id: int) -> list[BatchResult]:
        if batch_id == 1:
            raise RuntimeError("broken preview")
        return [BatchResult(batch_id=batch_id)]

    stage: EncodeStage[int] = EncodeStage(encode, sent.append, depth=1)
    for batch_id in range(4):
        stage.submit(batch_id)  # would block for ever once the thread had died
    stage.close(timeout=5)
    assert [m.batch_id for m in sent] == [0, 2, 3]
