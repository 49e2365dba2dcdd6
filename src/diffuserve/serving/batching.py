"""Which waiting requests form the next batch, and on which idle worker: the first request a worker can serve
with the compatible requests behind it, in a batch of a size that worker has warm."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from diffuserve.serving.priorities import PriorityRules, Waiting
from diffuserve.types import GenerationRequest


class Queued(Waiting, Protocol):
    """What forming a batch needs of a queued request: its class and arrival, and the request itself."""

    @property
    def request(self) -> GenerationRequest: ...


Pending = TypeVar("Pending", bound=Queued)


@dataclass(frozen=True)
class BatchShape:
    """What a batch may hold: up to `max_batch` images of requests with the same `key` (size, steps … and,
    where adapters split batches, the adapters), none of a lower class than its first."""

    max_batch: int
    key: Callable[[GenerationRequest], object]
    rules: PriorityRules


def next_batch(
    ordered: Sequence[Pending],
    idle: Sequence[int],
    warm_sizes: Mapping[int, frozenset[int]],
    shape: BatchShape,
    now: float,
) -> tuple[int, list[Pending]] | None:
    """The idle worker and the batch it runs next: the first request in serving order that an idle worker has
    a warm size for, with the compatible requests behind it, on the worker whose warm sizes take the most of
    them (a worker missing from `warm_sizes` runs every size warm). Where every worker runs every size warm,
    that is the head of the queue on the first idle worker. None when no idle worker can take any request."""
    for index, head in enumerate(ordered):
        best: tuple[int, list[Pending]] | None = None
        for worker_id in idle:
            group = compatible_group(head, ordered[index + 1 :], shape, now, warm_sizes.get(worker_id))
            if group and (best is None or images(group) > images(best[1])):
                best = (worker_id, group)
        if best is not None:
            return best
    return None


def compatible_group(
    head: Pending, after: Sequence[Pending], shape: BatchShape, now: float, warm: frozenset[int] | None = None
) -> list[Pending]:
    """The head and the compatible requests behind it, up to the batch limit, in a batch of a size the worker
    has warm (`warm`; None: any size); empty when the head alone is not a warm size. Requests of a lower class
    than the head's do not ride along: they would lengthen its batch."""
    limit = shape.max_batch if warm is None else max(warm, default=0)
    if head.request.n > limit:
        return []
    key = shape.key(head.request)
    level = shape.rules.level(head, now)
    group = [head]
    count = head.request.n
    for pending in after:
        if count >= limit:
            break
        if shape.rules.level(pending, now) < level:
            continue
        if shape.key(pending.request) == key and count + pending.request.n <= limit:
            group.append(pending)
            count += pending.request.n
    # Drop the last riders until the batch is a warm size (the head's own size may be the one not warm).
    while warm is not None and group and images(group) not in warm:
        group.pop()
    return group


def images(group: Sequence[Pending]) -> int:
    return sum(p.request.n for p in group)
