"""The child-side guard that ties a worker's life to its server's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _run(parent_pid_expr: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import os; from diffuserve.serving.parent_death import die_with_parent; "
        f"print(die_with_parent({parent_pid_expr}), flush=True)"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_child_of_a_live_parent_carries_on() -> None:
    result = _run("os.getppid()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_a_child_whose_parent_already_died_ends_itself() -> None:
    # The parent it was started by is gone (its pid no longer its parent's): the prctl came too late to fire.
    result = _run(f"{os.getpid()} + 1_000_000")
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)
    assert result.stdout == ""
