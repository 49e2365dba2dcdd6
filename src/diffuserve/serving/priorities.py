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


class Running(Waiting, Protocol):
    """What preemption needs of a running request: also whether it was stopped once already."""

    @property
    def preempted(self) -> bool: ...


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

    def may_preempt(self, running: Sequence[Running], step: int, steps: int, now: float) -> bool:
        """Whether a running batch of these requests may be stopped for an interactive request: only `batch`
        work not stopped before, not aged into the interactive class (it would only go first again), and
        with steps enough left to save."""
        if not self.preempt or not running:
            return False
        if any(r.priority is not Priority.BATCH or r.preempted for r in running):
            return False
        if any(self.level(r, now) >= TOP_LEVEL for r in running):
            return False
        return steps - step >= self.min_steps_left
