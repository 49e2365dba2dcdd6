"""The bytes of request bodies the server holds at once, across all requests: a request takes its body's size
from the budget before reading it and gives it back once the body is decoded; one that does not fit now is
refused (429, Retry-After) and one larger than the whole budget is 413."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from starlette.requests import Request

from diffuserve.errors import PayloadTooLarge, QueueFull

BODY_MEMORY_FULL = "body_memory_full"


class BodyBudget:
    """Only the event loop takes and gives back, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        if size > self.limit:
            raise PayloadTooLarge(
                f"a request body of {size} bytes is more than this server holds for all requests at once "
                f"({self.limit} bytes)"
            )
        if self.held + size > self.limit:
            # A 429 like a full queue's, under its own code. (The refused body is read and dropped as it
            # arrives, so the client sees this answer and may reuse its connection.)
            full = QueueFull(
                f"the server holds {self.held} bytes of other requests' bodies; this one's {size} do not fit in "
                f"its {self.limit}: retry shortly",
                retry_after=1,
            )
            full.code = BODY_MEMORY_FULL
            raise full
        self.held += size
        try:
            yield
        finally:
            self.held -= size


def body_size(request: Request, limit: int) -> int:
    """What a request's body will take: its Content-Length, else (chunked) the most its route reads, `limit`;
    never more than `limit`, beyond which the body is refused while it is read."""
    declared = request.headers.get("content-length", "")
    return min(int(declared), limit) if declared.isdigit() else limit


def hold_body(request: Request, limit: int) -> contextlib.AbstractContextManager[None]:
    """The request's body's share of the app's budget, held for the block."""
    budget: BodyBudget = request.app.state.body_budget
    return budget.hold(body_size(request, limit))
