"""Overrides of diffusers' context-parallel attention classes (its Ulysses and its ring), one per class at a
time: diffusers looks each class up by name in its attention dispatch on every call and has no switch for
another, so replacing the module attribute is all it takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ULYSSES = "TemplatedUlyssesAttention"
RING = "TemplatedRingAttention"

# The overrides in force in this process, by class name: the override's name and diffusers' own class.
_INSTALLED: dict[str, tuple[str, Any]] = {}


def install_override(class_name: str, name: str, make: Callable[[Any], Any]) -> None:
    """Make diffusers' dispatch use `make(attention_dispatch)` for its class `class_name` from now on, in
    this process, in place of any earlier override of that class. `make` gets the module with diffusers' own
    class in place, to derive from."""
    from diffusers.models import attention_dispatch

    if _INSTALLED.get(class_name, ("", None))[0] == name:
        return
    restore_override(class_name)
    original = getattr(attention_dispatch, class_name)
    _INSTALLED[class_name] = (name, original)
    setattr(attention_dispatch, class_name, make(attention_dispatch))


def restore_override(class_name: str) -> None:
    """Back to diffusers' own class `class_name`."""
    from diffusers.models import attention_dispatch

    if class_name in _INSTALLED:
        setattr(attention_dispatch, class_name, _INSTALLED.pop(class_name)[1])


def restore_overrides() -> None:
    """Back to diffusers' own classes, all of them."""
    for class_name in list(_INSTALLED):
        restore_override(class_name)
