"""On a fresh clone, `make serve` answers a request within 3 minutes (installing included), and once installed
it is ready within 10 seconds and answers within 15."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, free_port

INSTALL_BUDGET_S = 180
WARM_BUDGET_S = 15
READY_BUDGET_S = 10


def _serve_until_answered(clone: Path, budget: float) -> tuple[float, float, str]:
    """Run `make serve` in the clone; seconds until /health/ready first answers 200, until the first
    generation answers 200, and its output."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST"))}
    env.update(PORT=str(port), PATH=os.defpath + ":" + env.get("PATH", ""))
    started = time.monotonic()
    log = (clone / f"serve-{port}.log").open("wb")
    process = subprocess.Popen(
        ["make", "serve"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    ready: float | None = None
    try:
        while time.monotonic() - started < budget:
            assert process.poll() is None, (clone / f"serve-{port}.log").read_text(errors="replace")
            with contextlib.suppress(httpx.TransportError):
                if ready is None:
                    if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10).status_code != 200:
                        time.sleep(0.05)
                        continue
                    ready = time.monotonic() - started
                response = httpx.post(
                    f"http://127.0.0.1:{port}/v1/images/generations",
                    json={"prompt": "the digit 5"},
                    timeout=10,
                )
                if response.status_code == 200:
                    output = (clone / f"serve-{port}.log").read_text(errors="replace")
                    return ready, time.monotonic() - started, output
            time.sleep(0.05)
        raise AssertionError(
            f"make serve did not answer within {budget}s:\n"
            + (clone / f"serve-{port}.log").read_text(errors="replace")
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git")
def test_make_serve_on_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    _, cold, output = _serve_until_answered(clone, INSTALL_BUDGET_S)
    # The install says what it does before its first quiet minute; the server says where to go once ready.
    # (Under `make test`, the nested make first says which directory it enters.)
    lines = [line for line in output.splitlines() if not line.startswith("make")]
    assert lines[0].startswith("diffuserve: installing into .venv, once"), output
    assert "ready: API http://127.0.0.1:" in output, output
    # Start-up time once installed is mostly importing torch and diffusers in the worker: best of two
    # starts, so one slow moment of a shared machine does not decide it.
    starts = [_serve_until_answered(clone, budget) for budget in (60, 60)]
    ready, warm = min(start[0] for start in starts), min(start[1] for start in starts)
    print(
        f"make serve: first request answered {cold:.1f}s after the command (install included); once installed,"
        f" ready in {ready:.1f}s and answered in {warm:.1f}s"
    )
    assert cold < INSTALL_BUDGET_S
    assert ready <= READY_BUDGET_S, [start[2] for start in starts]
    assert warm < WARM_BUDGET_S
