"""Cache files written beside their final name and renamed into place, safe against concurrent writers."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object], suffix: str) -> None:
    """`write` fills a temporary file of its own name beside `path` (ending in `suffix`), which then replaces
    `path`: a reader never sees half a file, and writers at the same time (a model's workers, containers
    sharing a volume, whose processes may have the same pid) never share a temporary file. The file is 0644,
    so another user sharing the volume can read it (mkstemp makes 0600). What `write` raises is raised again,
    with the temporary file removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        temporary.chmod(0o644)
        write(temporary)
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
