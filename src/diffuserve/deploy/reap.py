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
    """A member is `diffuserve serve` or one of its multiprocessing workers; without /proc (not Linux) trust
    the record. The match is on whole arguments: nginx's master, whose title names /run/diffuserve/nginx.conf,
    or the gate that becomes it, must not pass for the model server."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if is_model_server_command(argv):
            return True
    return False


def is_model_server_command(argv: Sequence[bytes]) -> bool:
    """`argv` runs the model server (`diffuserve serve` in any of the launcher's forms) or a worker of it."""
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else b""
        # multiprocessing's spawn workers: `python -c "from multiprocessing.spawn import ..." --multiprocessing-fork`
        # (the resource tracker is `-c "from multiprocessing.resource_tracker import ..."`).
        if arg == b"--multiprocessing-fork" or (
            arg == b"-c" and following.startswith(b"from multiprocessing.")
        ):
            return True
    for i, arg in enumerate(argv):
        if arg != b"serve" or i == 0:
            continue
        launcher = argv[:i]
        for j, word in enumerate(launcher):
            after = launcher[j + 1] if j + 1 < len(launcher) else b""
            # The console script (`/venv/bin/diffuserve serve`), `python -m diffuserve[.cli] serve`, or
            # render's fallback `python -c "...from diffuserve.cli import main..." serve`.
            if word.rsplit(b"/", 1)[-1] == b"diffuserve":
                return True
            if word == b"-m" and after in (b"diffuserve", b"diffuserve.cli"):
                return True
            if word == b"-c" and b"diffuserve.cli" in after:
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
