"""benchmarks/tables.py's VAE table: ratios against eager, a variant that failed part-way, a missing shape."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks import tables

ENVIRONMENT = {
    "gpu": "GPU",
    "torch": "2",
    "diffusers": "0",
    "python": "3",
    "date": "today",
    "commit": "abc",
}


def result(ms: float, **extra: Any) -> dict[str, Any]:
    return {"ms": ms, "first_call_s": 0.5, **extra}


def test_vae_table_ratios_failures_and_missing_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {
        "environment": ENVIRONMENT,
        "shapes": {"a": [1, 64], "b": [4, 64]},
        "rows": [
            {"variant": "compiled", "shapes": {"a": result(25.0, vs_eager={"max_abs": 3, "psnr_db": 40.0})}},
            {"variant": "eager", "shapes": {"a": result(50.0), "b": result(200.0)}},
            {
                "variant": "other",
                "shapes": {"a": result(50.0, vs_eager={"max_abs": 0, "psnr_db": None})},
                "error": "OutOfMemoryError: a | b",
            },
        ],
    }
    monkeypatch.setattr(tables, "load", lambda name: data)
    lines = tables.vae("vae.json").splitlines()
    assert lines[2] == "| decode | a ms | b ms | first call s | pixels vs eager |"
    # Eager found by name, not by place; the shape a row lacks is a dash, in its own column.
    assert lines[4] == "| compiled | 25.0 (2.00×) | - | 0.5 | PSNR 40.0 dB, largest 3 of 255 |"
    assert lines[5] == "| eager | 50.0 | 200.0 | 0.5, 0.5 | - |"
    # What a failed variant measured before failing stays; the error cannot split the table.
    assert lines[6] == "| other | 50.0 (1.00×) | - | 0.5 | failed: OutOfMemoryError: a \\| b |"


def test_several_runs_give_one_table_each_against_their_own_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = {
        "one.json": {
            "environment": {**ENVIRONMENT, "date": "first"},
            "shapes": {"a": [1, 64]},
            "rows": [{"variant": "eager", "shapes": {"a": result(50.0)}}],
        },
        "two.json": {
            "environment": {**ENVIRONMENT, "date": "second"},
            "shapes": {"a": [1, 64]},
            "rows": [
                {"variant": "eager", "shapes": {"a": result(40.0)}},
                {"variant": "parts", "shapes": {"a": result(20.0, vs_eager={"max_abs": 1, "psnr_db": 50.0})}},
            ],
        },
    }
    monkeypatch.setattr(tables, "load", lambda name: runs[name])
    text = tables.vae("one.json", "two.json")
    first, second = text.split("\n\nGPU;")
    assert "; first;" in first and "| eager | 50.0 |" in first and "parts" not in first
    # The second run's variant is set against the second run's eager (40 ms), not the first's.
    assert "; second;" in second and "| parts | 20.0 (2.00×) |" in second
