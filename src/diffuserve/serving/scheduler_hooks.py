"""What the scheduler calls out to: the metrics hooks, and a request's sinks for its previews and progress."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from diffuserve.types import EncodedImage, Priority


class SchedulerObserver(Protocol):
    """Metrics hooks; the scheduler itself knows nothing of Prometheus."""

    def queue_depth(self, depth: int, by_priority: dict[Priority, int]) -> None: ...

    def batch_started(self, images: int, waits_s: list[float], priorities: list[Priority]) -> None: ...

    def preempted(self, requests: int) -> None: ...

    def adapters_used(self, loaded: dict[str, float], hits: list[str]) -> None: ...

    def prompts_encoded(self, hits: int, misses: int) -> None: ...


# Called with (partial_index, index of the first image in the client's request, the preview's images).
PartialSink = Callable[[int, int, list[EncodedImage]], None]
# Called with (step, steps) after each denoising step of the request's batch (its worker reports them only
# when the request asked: GenerationRequest.report_progress).
ProgressSink = Callable[[int, int], None]
