"""benchmarks/tables.py's index of the tables on other pages: each one's raw outputs with their runs, and its
baseline."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks import tables

ENVIRONMENT = {"gpu": "GPU", "torch": "2", "diffusers": "0", "python": "3", "date": "today", "commit": "abc"}


def test_every_table_elsewhere_is_listed_with_its_runs_and_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    raw: dict[str, Any] = {
        "run.json": {"environment": ENVIRONMENT},
        "rows.jsonl": [{"environment": {**ENVIRONMENT, "commit": "def"}}, {"environment": ENVIRONMENT}],
        "old.json": {"files": []},
    }
    monkeypatch.setattr(tables, "load", lambda name: raw[name])
    monkeypatch.setattr(tables, "PAGE_OF", {"vae": tables.ROOT / "docs" / "design" / "serving.md"})
    monkeypatch.setitem(tables.BLOCKS, "vae", (tables.vae, ("run.json", "rows.jsonl", "old.json")))
    lines = tables.elsewhere().splitlines()
    assert len(lines) == 3
    link, runs, baseline = (cell.strip() for cell in lines[2].strip("|").split("|"))
    assert link == "[vae](design/serving.md)"
    # A .jsonl run is named by its first row; a raw output without an environment says so.
    assert runs == (
        "`run.json`: GPU; torch 2, diffusers 0, Python 3; today; code abc.<br>"
        "`rows.jsonl`: GPU; torch 2, diffusers 0, Python 3; today; code def.<br>"
        "`old.json`: no environment recorded"
    )
    assert baseline == tables.BASELINES["vae"]


def test_every_page_of_a_table_has_a_baseline() -> None:
    assert set(tables.PAGE_OF) <= set(tables.BASELINES)
