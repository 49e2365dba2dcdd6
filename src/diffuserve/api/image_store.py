"""The image store behind `response_format: "url"`: one file per image in a folder, unguessable ids, images kept
for their whole lifetime, a bound in disk bytes that refuses new images rather than delete promised ones, and
images answered only to the key that made them."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
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
# The tag of the key that made an image (auth.owner_tag): 16 hex digits, in the file's name between id and type.
OWNER_PATTERN = re.compile(r"[0-9a-f]{16}")
# What a file is assumed to take on disk before it is written (then its real blocks are counted).
BLOCK_BYTES = 4096
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


class StoreFull(Exception):
    """The images do not fit in the bound without deleting images whose URLs are still promised."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"{needed} bytes needed, {free} free")
        self.needed = needed
        self.free = free


@dataclass
class Reservation:
    """Room held in a store for an answer's images until they are put (which takes it over) or it is released."""

    store: ImageStore
    size: int
    pixels: int
    media_type: str

    def release(self) -> None:
        if self.size:
            self.store._release(self)


@dataclass
class _Entry:
    suffix: str
    size: int  # bytes on disk: its blocks
    stored_at: float
    owner: str = ""

    def name(self, image_id: str) -> str:
        return f"{image_id}.{self.owner}{self.suffix}" if self.owner else f"{image_id}{self.suffix}"


def _estimate(size: int) -> int:
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES


def _disk_bytes(stat: os.stat_result) -> int:
    # Blocks, which is what fills a disk (a 100-byte file takes 4 KiB); never less than the bytes, should a
    # file system report no blocks for small or compressed files.
    return max(stat.st_blocks * 512, stat.st_size)


class ImageStore:
    """Files `<id>.<ext>` (`<id>.<owner>.<ext>` for an image made with an API key) under `root`; the extension
    keeps the content type. The folder belongs to one server process: its index (in memory, rebuilt from the
    folder on first use, so files left by an earlier run count toward the bound and expire by their mtime) is
    the truth about which ids exist.

    Expired images are deleted when asked for, on every put and by the periodic sweep. An image is never
    deleted before its lifetime: a put that does not fit in `max_bytes` (counted in disk blocks, with room
    reserved for puts under way) raises StoreFull and keeps nothing. Only a restart with a smaller bound
    deletes the oldest images of the earlier run. The async methods run the file I/O in a thread, off the
    event loop.
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
        self._reserved = 0  # room held by puts still writing their files
        self._opened = False
        self._bytes_per_pixel: dict[str, float] = {}  # the most seen, by media type: for reservations

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def reserve(self, count: int, pixels: int, media_type: str) -> Reservation:
        """Room for `count` images of `pixels` pixels each, held until put or released: asked before an answer
        is generated, so a full store refuses it before any work is spent on it. StoreFull when it does not
        fit."""
        return await asyncio.to_thread(self.reserve_sync, count, pixels, media_type)

    async def put(
        self, images: Sequence[EncodedImage], owner: str = "", reservation: Reservation | None = None
    ) -> list[str]:
        """Keep `images` for `owner` (a key's tag; "" without keys), in the room of `reservation` if any; their
        new ids, in order. StoreFull when they do not fit."""
        return await asyncio.to_thread(self.put_sync, images, owner, reservation)

    async def get(self, image_id: str, owner: str = "") -> StoredImage | None:
        """The image, or None when the id is malformed, unknown, expired or another owner's."""
        if not valid_id(image_id):
            return None
        return await asyncio.to_thread(self.get_sync, image_id, owner)

    def reserve_sync(self, count: int, pixels: int, media_type: str) -> Reservation:
        # Bytes per pixel: the most seen for this type so far, else an uncompressed RGB image's 3.
        per_image = _estimate(int(pixels * self._bytes_per_pixel.get(media_type, 3.0)))
        reservation = Reservation(self, count * per_image, pixels, media_type)
        with self._lock:
            self._open_locked()
            self._expire_locked(self._clock())
            if reservation.size > self._free_locked():
                raise StoreFull(reservation.size, self._free_locked())
            self._reserved += reservation.size
        return reservation

    def put_sync(
        self, images: Sequence[EncodedImage], owner: str = "", reservation: Reservation | None = None
    ) -> list[str]:
        for image in images:
            if image.media_type not in SUFFIXES:
                raise ValueError(f"the image store keeps {', '.join(SUFFIXES)}, not {image.media_type}")
        if owner and not OWNER_PATTERN.fullmatch(owner):
            raise ValueError("an owner is 16 hexadecimal digits")
        estimate = sum(_estimate(len(image.data)) for image in images)
        now = self._clock()
        with self._lock:
            self._open_locked()
            self._expire_locked(now)
            if reservation is not None:  # its room becomes this put's, with no gap another put could take
                self._reserved -= reservation.size
                reservation.size = 0
            if estimate > self._free_locked():
                raise StoreFull(estimate, self._free_locked())
            self._reserved += estimate
        written: list[tuple[str, _Entry]] = []
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for image in images:
                image_id = secrets.token_urlsafe(ID_BYTES)
                entry = _Entry(SUFFIXES[image.media_type], 0, now, owner)
                entry.size = self._write(self.root / entry.name(image_id), image.data, now)
                written.append((image_id, entry))
            with self._lock:
                self._reserved -= estimate
                estimate = 0
                size = sum(entry.size for _, entry in written)
                if size > self._free_locked():  # more blocks than estimated, and no room for them
                    raise StoreFull(size, self._free_locked())
                for image_id, entry in written:
                    self._entries[image_id] = entry
                    self._bytes += entry.size
                if reservation is not None and written:
                    self._learn_locked(reservation, size / len(written))
        except BaseException:
            with self._lock:
                self._reserved -= estimate
            for image_id, entry in written:
                _unlink(self.root / entry.name(image_id))
            raise
        return [image_id for image_id, _ in written]

    def get_sync(self, image_id: str, owner: str = "") -> StoredImage | None:
        if not valid_id(image_id):
            return None
        with self._lock:
            self._open_locked()
            entry = self._entries.get(image_id)
            if entry is None or not hmac.compare_digest(entry.owner, owner):
                return None
            age = self._clock() - entry.stored_at
            if age >= self.ttl_seconds:
                self._remove_locked(image_id)
                return None
        try:
            # Outside the lock: a file deleted meanwhile (evicted, or by hand) is simply gone.
            data = (self.root / entry.name(image_id)).read_bytes()
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

    def _write(self, path: Path, data: bytes, stored_at: float) -> int:
        """Writes `data` to `path`; the bytes it takes on disk."""
        # Temp file + rename: a reader sees the whole image or no file, never a part. mkstemp's 0600 keeps
        # the images private to the server's user. No fsync: these files live minutes and a crash loses
        # nothing a client cannot generate again.
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                size = _disk_bytes(os.fstat(handle.fileno()))
            # The mtime is the image's age across restarts: set it from the store's clock.
            os.utime(temp, (stored_at, stored_at))
            os.replace(temp, path)
        except BaseException:
            _unlink(Path(temp))
            raise
        return size

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
            image_id, _, rest = item.name.partition(".")
            owner, _, extension = rest.rpartition(".")
            suffix = "." + extension
            temp = item.name.startswith(TEMP_PREFIX)
            ours = (
                valid_id(image_id)
                and suffix in MEDIA_TYPES
                and (not owner or OWNER_PATTERN.fullmatch(owner) is not None)
            )
            if not temp and not ours:
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
                found.append(
                    (stat.st_mtime, image_id, _Entry(suffix, _disk_bytes(stat), stat.st_mtime, owner))
                )
        for _, image_id, entry in sorted(found, key=lambda row: row[0]):
            self._entries[image_id] = entry
            self._bytes += entry.size
        self._opened = True
        self._expire_locked(self._clock())
        # Only here may a live image go: an earlier run's, when the bound has been lowered since.
        while self._bytes > self.max_bytes and self._entries:
            self._remove_locked(next(iter(self._entries)))

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

    def _free_locked(self) -> int:
        return self.max_bytes - self._bytes - self._reserved

    def _learn_locked(self, reservation: Reservation, size_per_image: float) -> None:
        if reservation.pixels > 0:
            seen = self._bytes_per_pixel.get(reservation.media_type, 0.0)
            self._bytes_per_pixel[reservation.media_type] = max(seen, size_per_image / reservation.pixels)

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            self._reserved -= reservation.size
            reservation.size = 0

    def _remove_locked(self, image_id: str) -> None:
        entry = self._entries.pop(image_id)
        self._bytes -= entry.size
        _unlink(self.root / entry.name(image_id))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
