"""Acceleration tiers S/M/L/XL: named recipes applied to a loaded pipeline (compile, fp8, step caching)."""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)


class Tier(str, Enum):
    XL = "XL"
    L = "L"
    M = "M"
    S = "S"


def apply_tier(pipeline: Any, tier: Tier, *, device: str, cache_dir: str) -> list[str]:
    """Apply a tier's recipe in place; returns human-readable notes of what was (and was not) applied."""
    notes = [f"tier {tier.value}: no acceleration recipe applied on {device}"]
    for note in notes:
        log.info(note)
    return notes
