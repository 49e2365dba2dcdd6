"""A model's weight files read into the page cache in the background while the worker imports, so a cold
start's disk reads overlap its imports instead of following them."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CHUNK = 16 << 20
# A file whose first chunks come faster than this is in the page cache already (a disk gives 1-3 GB/s, the
# page cache 5+): the rest of it is skipped, so a warm start pays no copy for nothing.
CACHED_GB_S = 4.0
SAMPLE = 8 * CHUNK
# Reading more than this share of the memory the kernel reports available would evict the files' own first
# pages before the loader reads them.
MEMORY_SHARE = 0.8


@dataclass
class PrefetchResult:
    files: int = 0
    read_bytes: int = 0  # read from the files (from disk or, for the samples, the page cache)
    cached_files: int = 0  # found in the page cache after their sample: skipped
    seconds: float = 0.0


def weight_files(path: str) -> list[Path]:
    """The weight files of a local pipeline folder (a hub snapshot's links resolved), in path order: the order
    of the components in `model_index.json` that diffusers loads them in. Only the safetensors where a folder
    has them, as diffusers loads them over any other format. Empty where `path` is no folder."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return []
    files = [f for f in sorted(folder.rglob("*")) if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    if any(f.suffix == ".safetensors" for f in files):
        files = [f for f in files if f.suffix == ".safetensors"]
    return [f.resolve() for f in files]


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where the system has no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def start_prefetch(path: str) -> threading.Thread | None:
    """Start reading `path`'s weight files on a daemon thread (reads release the GIL: imports go on beside it);
    None where there is nothing to read or the files would not fit in memory together."""
    # A pipeline folder only: a built-in model's name may also name some folder in the working directory.
    files = weight_files(path) if (Path(path).expanduser() / "model_index.json").is_file() else []
    total = sum(f.stat().st_size for f in files)
    if not total:
        return None
    memory = available_memory()
    if memory is not None and total > memory * MEMORY_SHARE:
        log.info("weights: %.1f GB exceed the memory to read them ahead; read when loaded", total / 1e9)
        return None
    thread = threading.Thread(target=_prefetch_logged, args=(files,), name="weights-prefetch", daemon=True)
    thread.start()
    return thread


def _prefetch_logged(files: list[Path]) -> None:
    result = prefetch(files)
    log.info(
        "weights read ahead: %.1f GB from %d file(s) in %.1f s (%d already in the page cache)",
        result.read_bytes / 1e9, result.files, result.seconds, result.cached_files,
    )  # fmt: skip


def prefetch(files: list[Path]) -> PrefetchResult:
    """Read each file through once; a file whose first chunks read at page-cache speed is skipped after them."""
    result = PrefetchResult()
    started = time.perf_counter()
    buffer = bytearray(CHUNK)
    for file in files:
        try:
            result.read_bytes += _read_through(file, buffer, result)
        except OSError as exc:  # the loader reports a file it cannot read; a prefetch only tries
            log.debug("weights: could not read %s ahead: %s", file, exc)
        result.files += 1
    result.seconds = time.perf_counter() - started
    return result


def _read_through(file: Path, buffer: bytearray, result: PrefetchResult) -> int:
    done = 0
    with open(file, "rb", buffering=0) as fh:
        started = time.perf_counter()
        while count := fh.readinto(buffer):
            sampled = done < SAMPLE <= done + count
            done += count
            if sampled and done / (time.perf_counter() - started) > CACHED_GB_S * 1e9:
                result.cached_files += 1
                break
    return done
