"""A model's weight files read into the page cache in the background while the worker imports, so a cold
start's disk reads overlap its imports instead of following them."""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CHUNK = 16 << 20
# A file this much in the page cache already is not read again (a warm start pays no copy for nothing).
CACHED_SHARE = 0.9
# Reading more than this share of the memory the kernel reports available would evict the files' own first
# pages before the loader reads them.
MEMORY_SHARE = 0.8
_LOW_BIT = bytes(value & 1 for value in range(256))


@dataclass
class PrefetchResult:
    files: int = 0
    read_bytes: int = 0
    cached_files: int = 0  # found in the page cache already: not read
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
    """Read each file through once, but for those the page cache holds already."""
    result = PrefetchResult()
    started = time.perf_counter()
    buffer = bytearray(CHUNK)
    for file in files:
        result.files += 1
        try:
            share = resident_share(file)
            if share is not None and share >= CACHED_SHARE:
                result.cached_files += 1
                continue
            with open(file, "rb", buffering=0) as fh:
                while count := fh.readinto(buffer):
                    result.read_bytes += count
        except OSError as exc:  # the loader reports a file it cannot read; a prefetch only tries
            log.debug("weights: could not read %s ahead: %s", file, exc)
    result.seconds = time.perf_counter() - started
    return result


def resident_share(file: Path) -> float | None:
    """The share of `file`'s pages in the page cache (mincore(2) on a mapping of it, nothing read); None where
    the C library has no mincore. Timing a first read instead misjudges when the imports hold the interpreter."""
    size = file.stat().st_size
    if not size:
        return 1.0
    libc = _libc()
    if libc is None:
        return None
    page = mmap.PAGESIZE
    with open(file, "rb") as fh:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + page - 1) // page
            vector = ctypes.create_string_buffer(pages)
            if libc.mincore(address, size, vector) != 0:
                return None
            # Bit 0 of each page's byte says resident (the others are reserved); counted at C speed.
            return vector.raw.translate(_LOW_BIT).count(1) / pages
        finally:
            libc.munmap(address, size)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library this interpreter is linked to
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc
