"""Model-server launcher: kill what a crashed predecessor left behind, then exec the server in this process.

supervisord makes each program a process-group leader, and the server's GPU workers share that group. When
the server itself is killed (OOM killer, `kill -9`), supervisord restarts it but its orphaned workers may
still hold GPU memory; the new server would then fail to load. This launcher records its group id and, on
the next start, kills the previous group if any process of it is still alive.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def reap_previous_group(pgid_file: Path, *, grace: float = 5.0) -> bool:
    """TERM (then KILL) the process group recorded in `pgid_file`; True if one was still alive."""
    try:
        pgid = int(pgid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    if pgid <= 1 or pgid == os.getpgrp():
        return False
    if not _group_alive(pgid):
        return False
    if not _looks_like_model_server(pgid):
        # The id was reused by an unrelated group (e.g. nginx's): leave it alone.
        print(f"reap: group {pgid} is not a diffuserve server's; leaving it", flush=True)
        return False
    print(f"reap: stopping processes left by the previous model server (group {pgid})", flush=True)
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
    return True


def _looks_like_model_server(pgid: int) -> bool:
    """A member runs diffuserve or a multiprocessing worker; without /proc (not Linux) trust the record."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"diffuserve" in cmdline or b"multiprocessing" in cmdline:
            return True
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # not ours: never touch it
    return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffuserve.deploy.reap",
        description="Kill the previous model server's leftover processes, then exec COMMAND.",
    )
    parser.add_argument(
        "--pgid-file", required=True, type=Path, help="where the current group id is recorded"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to exec is required after --")
    reap_previous_group(args.pgid_file)
    if os.getpgrp() != os.getpid():
        # Started outside supervisord: become a group leader so the recorded id covers the server's workers.
        with contextlib.suppress(PermissionError):  # a session leader cannot move; its group is still ours
            os.setpgid(0, 0)
    args.pgid_file.write_text(f"{os.getpgrp()}\n")
    os.execvp(command[0], command)
    return 127


if __name__ == "__main__":
    sys.exit(main())
