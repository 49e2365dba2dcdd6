"""Ties a child process's life to its parent's: Linux's PR_SET_PDEATHSIG, as SGLang and vLLM set it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> bool:
    """Have the kernel send `signum` to this process when its parent dies; False where that is unsupported.

    Call it first thing in the child. The kernel watches the parent *thread* that started the child, so the
    parent must start its children from a thread that lives as long as it does (the server's event loop).
    A parent that died before this call would never trigger the signal: that case is checked right after,
    and the child then signals itself, as the kernel would have.
    """
    if not sys.platform.startswith("linux"):
        return False  # such a child still exits at its pipe's EOF, once it is between batches
    libc = ctypes.CDLL(None, use_errno=True)  # the C library this interpreter is already linked to
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        # Orphaned already: the parent died between starting this process and the prctl above.
        os.kill(os.getpid(), signum)
    return True
