"""Overrides of diffusers' context-parallel attention classes: one per class at a time, each derived from
diffusers' own class, and all of them undone together."""

from __future__ import annotations

from diffusers.models import attention_dispatch

from diffuserve.engine.dispatch_override import RING, ULYSSES, install_override, restore_overrides
from diffuserve.engine.ring_p2p import _ring_class
from diffuserve.engine.ulysses import install_fused_qkv
from diffuserve.engine.ulysses_p2p import _p2p_class


def test_one_override_per_class_each_derived_from_diffusers_own() -> None:
    ulysses, ring = attention_dispatch.TemplatedUlyssesAttention, attention_dispatch.TemplatedRingAttention
    try:
        install_fused_qkv()
        install_override(ULYSSES, "p2p", _p2p_class)  # replaces the stacked exchange's override
        install_override(RING, "p2p", _ring_class)  # beside it: another class
        installed = attention_dispatch.TemplatedUlyssesAttention
        # Derived from diffusers' own class, not from the override it replaced.
        assert installed.__name__ == "P2PUlyssesAttention" and installed.__bases__ == (ulysses,)
        installed = attention_dispatch.TemplatedRingAttention
        assert installed.__name__ == "P2PRingAttention" and installed.__bases__ == (ring,)
    finally:
        restore_overrides()
    assert attention_dispatch.TemplatedUlyssesAttention is ulysses
    assert attention_dispatch.TemplatedRingAttention is ring
