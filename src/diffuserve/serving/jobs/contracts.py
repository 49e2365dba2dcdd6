"""What the job manager needs of the rest of the server (the generation service, the API's validation and
answers, the metrics hooks) and what it answers (a job's status)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from diffuserve.serving.jobs.store import JobRecord
from diffuserve.serving.scheduler import Pending
from diffuserve.serving.scheduler_hooks import ProgressSink
from diffuserve.types import Completed, GenerationRequest

# Validates a stored job's body again (after a restart), the same way its route did.
Prepare = Callable[[JobRecord], Awaitable[GenerationRequest]]
# The answer a synchronous request would have had, as JSON bytes.
Render = Callable[[JobRecord, GenerationRequest, Completed], Awaitable[bytes]]
# A finished job's webhook payload (JSON bytes).
Payload = Callable[[JobRecord], bytes]


class JobService(Protocol):
    """What jobs need of the generation service (serving.service.GenerationService)."""

    fatal_error: str | None

    @property
    def ready(self) -> bool: ...

    def submit(
        self, request: GenerationRequest, on_partial: None = None, on_progress: ProgressSink | None = None
    ) -> list[Pending]: ...

    async def wait(self, pendings: list[Pending], *, timeout: float) -> Completed: ...

    def queue_position(self, pendings: list[Pending]) -> int | None: ...

    def progress(self, pendings: list[Pending]) -> tuple[int, int] | None: ...

    def queued(self, model: str) -> int: ...

    def batch_capacity(self, model: str) -> int: ...


class JobObserver(Protocol):
    """Metrics hooks: a job moved between states (None: it appeared or was forgotten); a webhook attempt."""

    def job_moved(self, old: str | None, new: str | None, final: bool) -> None: ...

    def webhook(self, outcome: str) -> None: ...


@dataclass
class JobStatus:
    """A job as stored, and where it stands now: its queue position while queued, its step while running."""

    record: JobRecord
    position: int | None = None
    step: int | None = None
    steps: int | None = None
