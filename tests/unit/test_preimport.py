"""The tier's modules imported during the load: which ones per tier and device, and a failure left to the phase
that needs the module."""

from __future__ import annotations

import sys

import pytest

from diffuserve.engine import preimport


@pytest.mark.parametrize(
    ("tier", "device", "expected"),
    [
        ("E", "cuda:0", []),
        ("XL", "cuda:0", [preimport.COMPILER]),
        ("L", "cuda:0", [preimport.FP8, preimport.COMPILER]),
        ("L", "cpu", []),
    ],
)
def test_the_modules_a_tier_imports_after_the_load(tier: str, device: str, expected: list[str]) -> None:
    assert preimport.tier_modules(tier, device) == expected


def test_modules_are_imported_on_a_thread_and_a_missing_one_is_skipped() -> None:
    sys.modules.pop("json.tool", None)
    thread = preimport.start_preimport(["diffuserve_no_such_module", "json.tool"])
    assert thread is not None
    thread.join(10)
    assert "json.tool" in sys.modules
    assert preimport.start_preimport([]) is None
