"""Priority classes in the queue: which waiting request goes next (with aging), and when a running batch of
`batch` work is stopped for an interactive request (preemption)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from diffuserve.types import Priority

TOP_LEVEL = Priority.INTERACTIVE.level


class Waiting(Protocol):
    """What the ordering needs of a queued request."""

    @property
    def priority(self) -> Priority: ...

    @property
    def enqueued_at(self) -> float: ...


@dataclass(frozen=True)
class PriorityRules:
    """`aging_s`: a request rises one class for every `aging_s` seconds it has waited (0: never), so a `batch`
    request waits at most about 2 × aging_s behind a stream of interactive ones.

    `preempt`: an interactive request that finds every worker busy stops one running batch made only of `batch`
    work at its next denoising step, and that batch's requests queue again (ahead of later batch work). It
    waits about one step instead of the rest of the batch. The cost is the stopped batch's finished steps,
    computed again; each request is stopped at most once, so every batch job gets through and loses at most one
    partial run. A batch with fewer than `min_steps_left` steps to go is left to finish."""

    aging_s: float = 30.0
    preempt: bool = True
    min_steps_left: int = 2

    def level(self, waiting: Waiting, now: float) -> int:
        """The class a request competes in now: its own, raised by how long it has waited."""
        base = waiting.priority.level
        if self.aging_s <= 0 or base >= TOP_LEVEL:
            return base
        return min(TOP_LEVEL, base + int(max(0.0, now - waiting.enqueued_at) // self.aging_s))

    def order(self, queue: Sequence[Waiting], now: float) -> list[int]:
        """Indices of `queue` in serving order: highest class first, first come first within a class."""
        return sorted(range(len(queue)), key=lambda i: (-self.level(queue[i], now), queue[i].enqueued_at))

    def may_preempt(self, running: Sequence[Priority], step: int, steps: int, preempted_before: bool) -> bool:
        """Whether a running batch of these requests' classes may be stopped for an interactive request."""
        if not self.preempt or preempted_before or not running:
            return False
        if any(priority is not Priority.BATCH for priority in running):
            return False
        return steps - step >= self.min_steps_left
