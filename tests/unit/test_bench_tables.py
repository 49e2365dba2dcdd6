"""The GPU tables of docs/benchmarks.md are exactly what the committed raw outputs give."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_tables_match_the_raw_outputs() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
