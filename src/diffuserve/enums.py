"""The fixed sets of string values every layer shares: acceleration tiers, priority classes, job states; imports
nothing of the project."""

from __future__ import annotations

from enum import Enum


class StrChoice(str, Enum):
    """A setting's fixed set of string values: compares and prints as its value, read case-insensitively."""

    def __str__(self) -> str:
        # The value in f-strings and logs ("S", not "Tier.S"), on every Python version.
        return str(self.value)

    @classmethod
    def _missing_(cls, value: object) -> StrChoice | None:
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.strip().lower():
                    return member
        return None


class Tier(StrChoice):
    """Acceleration tiers. E: exact, nothing applied (no torch.compile). XL: exact (compiled).
    L: near-lossless. M: between. S: fastest."""

    E = "E"
    XL = "XL"
    L = "L"
    M = "M"
    S = "S"

    @classmethod
    def parse(cls, value: str | Tier) -> Tier:
        if isinstance(value, Tier):
            return value
        try:
            return cls(str(value))
        except ValueError:
            raise ValueError(
                f"tier must be one of {', '.join(t.value for t in cls)}, got {value!r}"
            ) from None


class Priority(StrChoice):
    """A request's scheduling class: higher classes are served first, and a waiting request rises one class
    every PRIORITY_AGING_SECONDS, so no class starves."""

    INTERACTIVE = "interactive"
    DEFAULT = "default"
    BATCH = "batch"

    @property
    def level(self) -> int:
        """2 for interactive, 1 for default, 0 for batch."""
        return {"interactive": 2, "default": 1, "batch": 0}[self.value]


class JobState(StrChoice):
    """Where an asynchronous job stands; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
