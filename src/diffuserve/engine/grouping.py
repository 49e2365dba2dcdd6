"""Items in their order, cut into consecutive groups whose sizes add up to a budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def grouped_by_size(items: Iterable[T], size_of: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Consecutive groups of `items` whose sizes sum to at most `budget`; an item over the budget is a group
    of its own."""
    group: list[T] = []
    used = 0
    for item in items:
        size = size_of(item)
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(item)
        used += size
    if group:
        yield group
