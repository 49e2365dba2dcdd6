"""Readiness gate: wait until a URL answers 200, then exec the real command (nginx) in this process."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import FrameType


def is_ready(url: str, timeout: float = 2.0) -> bool:
    """True only for a 200; connection errors and 503 (model still loading) both mean "not yet"."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until_ready(url: str, *, interval: float, timeout: float, log_every: float = 30.0) -> bool:
    """Poll `url`; `timeout` 0 waits forever (a large model can take many minutes to load)."""
    started = time.monotonic()
    last_log = started
    while True:
        if is_ready(url):
            return True
        now = time.monotonic()
        if timeout and now - started >= timeout:
            return False
        if now - last_log >= log_every:
            print(f"gate: still waiting for {url} ({now - started:.0f}s)", flush=True)
            last_log = now
        time.sleep(interval)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # supervisord stops nginx's program with QUIT; before the exec this process is still the gate.
    sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffuserve.deploy.gate",
        description="Wait until URL answers 200, then exec COMMAND (e.g. nginx).",
    )
    parser.add_argument(
        "--url", required=True, help="readiness URL, e.g. http://127.0.0.1:8001/v2/health/ready"
    )
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between polls")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="give up after this many seconds (0 = never)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to exec is required after --")
    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    print(f"gate: waiting for {args.url} before starting {command[0]}", flush=True)
    if not wait_until_ready(args.url, interval=args.interval, timeout=args.timeout):
        print(
            f"gate: {args.url} not ready after {args.timeout:.0f}s; exiting so supervisord retries",
            flush=True,
        )
        return 1
    print(f"gate: {args.url} is ready; exec {' '.join(command)}", flush=True)
    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    os.execvp(command[0], command)
    return 127  # execvp only returns by raising


if __name__ == "__main__":
    sys.exit(main())
