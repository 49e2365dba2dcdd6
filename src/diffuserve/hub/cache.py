"""Where the hub library keeps models (read from the environment when asked), and what the cache holds."""

from __future__ import annotations

import os
import re
from pathlib import Path

from diffuserve.hub.files import missing_files

_COMMIT = re.compile(r"[0-9a-f]{40}")


def cache_dir() -> Path:
    """The hub cache, read from the environment now (as the hub library reads it when imported), so a server
    that sets HF_HOME after start-up still pulls where its workers, which import the library later, will look."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    hub = (
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    )
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def _storage(repo: str) -> Path:
    # The cache's documented layout: models--{org}--{name}/{blobs,refs,snapshots}.
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of `repo` at `revision` (a branch, tag or commit) in the cache, if any; no network."""
    storage = _storage(repo)
    if revision and _COMMIT.fullmatch(revision):
        commit = revision
    else:
        ref = storage / "refs" / (revision or "main")
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def is_cached(repo: str, revision: str | None = None) -> bool:
    """Whether the cache holds a complete pipeline of `repo` at `revision` (default: main); no network."""
    snapshot = cached_snapshot(repo, revision)
    return snapshot is not None and not missing_files(snapshot)
