"""The image store behind `response_format: "url"`: one file per image in a folder, unguessable ids, expiry by
age and a byte bound that deletes the oldest first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffuserve.types import EncodedImage

log = logging.getLogger(__name__)

# secrets.token_urlsafe(24): 32 characters of the URL-safe base64 alphabet, 192 random bits.
ID_BYTES = 24
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{32}")
SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpeg", "image/webp": ".webp"}
MEDIA_TYPES = {suffix: media_type for media_type, suffix in SUFFIXES.items()}
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 600.0
SWEEP_INTERVAL_S = 60.0


def valid_id(image_id: str) -> bool:
    """Whether `image_id` has the exact shape of an id this store makes: checked before any path is built, so
    no client text (`..`, `/`, NUL, a 10 kB name) ever reaches the filesystem."""
    return ID_PATTERN.fullmatch(image_id) is not None


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires_in: float  # seconds left before the image's URL answers 404


@dataclass
class _Entry:
    suffix: str
    size: int
    stored_at: float


class ImageStore:
    """Files `<id>.<ext>` under `root`; the extension keeps the content type. The folder belongs to one server
    process: its index (in memory, rebuilt from the folder on first use, so files left by an earlier run count
    toward the bound and expire by their mtime) is the truth about which ids exist.

    Expired images are deleted when asked for and on every put; beyond `max_bytes` the oldest go first, but
    never the images of the put that overflowed (a fresh URL must work), so one answer larger than the bound
    is kept whole until the next put. The async methods run the file I/O in a thread, off the event loop.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_bytes: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        self._opened = False

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def put(self, images: Sequence[EncodedImage]) -> list[str]:
        """Keep `images`; their new ids, in order."""
        return await asyncio.to_thread(self.put_sync, images)

    async def get(self, image_id: str) -> StoredImage | None:
        """The image, or None when the id is malformed, unknown, expired or evicted."""
        if not valid_id(image_id):
            return None
        return await asyncio.to_thread(self.get_sync, image_id)

    def put_sync(self, images: Sequence[EncodedImage]) -> list[str]:
        for image in images:
            if image.media_type not in SUFFIXES:
                raise ValueError(f"the image store keeps {', '.join(SUFFIXES)}, not {image.media_type}")
        with self._lock:
            self._open_locked()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = self._clock()
        written: list[tuple[str, str, int]] = []
        try:
            for image in images:
                image_id = secrets.token_urlsafe(ID_BYTES)
                suffix = SUFFIXES[image.media_type]
                self._write(self.root / f"{image_id}{suffix}", image.data, now)
                written.append((image_id, suffix, len(image.data)))
        except BaseException:
            for image_id, suffix, _ in written:
                _unlink(self.root / f"{image_id}{suffix}")
            raise
        with self._lock:
            self._expire_locked(now)
            for image_id, suffix, size in written:
                self._entries[image_id] = _Entry(suffix, size, now)
                self._bytes += size
            self._evict_locked(keep=len(written))
        return [image_id for image_id, _, _ in written]

    def get_sync(self, image_id: str) -> StoredImage | None:
        if not valid_id(image_id):
            return None
        with self._lock:
            self._open_locked()
            entry = self._entries.get(image_id)
            if entry is None:
                return None
            age = self._clock() - entry.stored_at
            if age >= self.ttl_seconds:
                self._remove_locked(image_id)
                return None
        try:
            # Outside the lock: a file deleted meanwhile (evicted, or by hand) is simply gone.
            data = (self.root / f"{image_id}{entry.suffix}").read_bytes()
        except FileNotFoundError:
            with self._lock:
                if self._entries.get(image_id) is entry:
                    self._remove_locked(image_id)
            return None
        return StoredImage(data, MEDIA_TYPES[entry.suffix], self.ttl_seconds - age)

    async def sweep_forever(self) -> None:
        """Delete expired images every SWEEP_INTERVAL_S (sooner with a shorter lifetime), so none outlives its
        lifetime by much on a server that stores nothing more; runs until cancelled."""
        interval = min(SWEEP_INTERVAL_S, self.ttl_seconds)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.sweep)
            except Exception as exc:  # a failed sweep must not end the sweeping
                log.warning("image store %s: sweep failed: %s", self.root, exc)

    def sweep(self) -> int:
        """Delete every expired image now; how many went."""
        with self._lock:
            self._open_locked()
            before = len(self._entries)
            self._expire_locked(self._clock())
            return before - len(self._entries)

    def _write(self, path: Path, data: bytes, stored_at: float) -> None:
        # Temp file + rename: a reader sees the whole image or no file, never a part. mkstemp's 0600 keeps
        # the images private to the server's user. No fsync: these files live minutes and a crash loses
        # nothing a client cannot generate again.
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            # The mtime is the image's age across restarts: set it from the store's clock.
            os.utime(temp, (stored_at, stored_at))
            os.replace(temp, path)
        except BaseException:
            _unlink(Path(temp))
            raise

    def _open_locked(self) -> None:
        if self._opened:
            return
        found: list[tuple[float, str, _Entry]] = []
        try:
            with os.scandir(self.root) as listing:
                items = list(listing)
        except FileNotFoundError:
            items = []  # a folder that does not exist yet holds nothing: the first put creates it
        for item in items:
            image_id, dot, extension = item.name.partition(".")
            suffix = dot + extension
            temp = item.name.startswith(TEMP_PREFIX)
            if not temp and (not valid_id(image_id) or suffix not in MEDIA_TYPES):
                continue  # not ours: left alone, not counted
            try:
                stat = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if temp:
                # A write an earlier run did not finish; a fresh one may be another server's, under way.
                if self._clock() - stat.st_mtime > STALE_TEMP_SECONDS:
                    _unlink(Path(item.path))
            elif item.is_file(follow_symlinks=False):
                found.append((stat.st_mtime, image_id, _Entry(suffix, stat.st_size, stat.st_mtime)))
        for _, image_id, entry in sorted(found, key=lambda row: row[0]):
            self._entries[image_id] = entry
            self._bytes += entry.size
        self._opened = True
        self._expire_locked(self._clock())
        self._evict_locked(keep=0)
        if found:
            log.info(
                "image store %s: %d image(s) of an earlier run, %d kept (%d bytes)",
                self.root,
                len(found),
                len(self._entries),
                self._bytes,
            )

    def _expire_locked(self, now: float) -> None:
        # Entries are in storing order, so the expired ones are at the front.
        while self._entries:
            image_id, entry = next(iter(self._entries.items()))
            if now - entry.stored_at < self.ttl_seconds:
                break
            self._remove_locked(image_id)

    def _evict_locked(self, keep: int) -> None:
        while self._bytes > self.max_bytes and len(self._entries) > keep:
            self._remove_locked(next(iter(self._entries)))

    def _remove_locked(self, image_id: str) -> None:
        entry = self._entries.pop(image_id)
        self._bytes -= entry.size
        _unlink(self.root / f"{image_id}{entry.suffix}")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
