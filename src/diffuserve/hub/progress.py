"""Progress of a model download: the PullProgress snapshot, its one-line text, and a throttled log of it."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# How often a download tells its listener at most: often enough for a live bar, rare enough to cost nothing.
REPORT_INTERVAL_S = 0.25
# The speed is measured over this recent window, so that the ETA follows the current speed, not the average.
RATE_WINDOW_S = 5.0


@dataclass(frozen=True)
class PullProgress:
    """Where a download stands. `bytes_done` counts what is already on disk, resumed bytes included; the speed
    counts only what this run received."""

    repo: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    current_file: str | None
    bytes_per_second: float
    eta_seconds: float | None

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0

    @property
    def finished(self) -> bool:
        return self.files_done >= self.files_total

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, for a readiness answer."""
        return {
            "repo": self.repo,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "current_file": self.current_file,
            "bytes_per_second": round(self.bytes_per_second),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
        }


_UNITS = ("B", "kB", "MB", "GB", "TB")


def _scale(nbytes: float) -> tuple[float, str]:
    """Decimal units, as the hub's web pages show sizes."""
    value, unit = float(nbytes), _UNITS[0]
    for unit in _UNITS:
        if value < 1000 or unit == _UNITS[-1]:
            break
        value /= 1000
    return value, unit


def _three_digits(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_bytes_pair(done: int, total: int) -> str:
    """'1.20/24.0 GB': both in the total's unit."""
    value, unit = _scale(total)
    factor = total / value if value else 1.0
    return f"{_three_digits(done / factor)}/{_three_digits(value)} {unit}"


def format_rate(bytes_per_second: float) -> str:
    value, unit = _scale(bytes_per_second)
    return f"{value:.0f} {unit}/s" if value >= 10 else f"{value:.1f} {unit}/s"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA --"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"ETA {hours}h{minutes:02d}m"
    if minutes:
        return f"ETA {minutes}m{secs:02d}s"
    return f"ETA {secs}s"


def format_progress(progress: PullProgress, name: str | None = None) -> str:
    """'black-forest-labs/FLUX.1-schnell  1.20/24.0 GB  5%  118 MB/s  ETA 3m12s'."""
    parts = [
        name or progress.repo,
        format_bytes_pair(progress.bytes_done, progress.bytes_total),
        f"{progress.fraction * 100:.0f}%",
        format_rate(progress.bytes_per_second),
        "done" if progress.finished else format_eta(progress.eta_seconds),
    ]
    return "  ".join(parts)


def throttled(emit: Callable[[PullProgress], None], interval_s: float) -> Callable[[PullProgress], None]:
    """`emit` at most every `interval_s` seconds, plus the first report and the last."""
    last = [float("-inf")]

    def report(progress: PullProgress) -> None:
        now = time.monotonic()
        if progress.finished or now - last[0] >= interval_s:
            last[0] = now
            emit(progress)

    return report


def progress_line(progress: PullProgress, name: str | None = None) -> str:
    """A log line: 'pulling NAME  1.20/24.0 GB  5%  118 MB/s  ETA 3m12s  (3/17 files)'."""
    return f"pulling {format_progress(progress, name)}  ({progress.files_done}/{progress.files_total} files)"


def log_progress(
    name: str, *, interval_s: float = 5.0, logger: logging.Logger | None = None
) -> Callable[[PullProgress], None]:
    """A `progress` callback for `hub.pull` that logs a line every `interval_s` seconds (and the first and the
    last), so a long download shows in a server's log without flooding it."""
    log = logger or logging.getLogger("diffuserve.hub")
    return throttled(lambda progress: log.info("%s", progress_line(progress, name)), interval_s)


class ProgressTracker:
    """Counts a download's bytes and files from any number of threads and tells `listener` a PullProgress at
    most every REPORT_INTERVAL_S (and always at the end)."""

    def __init__(
        self,
        repo: str,
        listener: Callable[[PullProgress], None] | None,
        *,
        bytes_total: int,
        files_total: int,
        bytes_done: int = 0,
        files_done: int = 0,
        parts: Mapping[str, int] | None = None,
    ) -> None:
        """`bytes_done` includes `parts`: bytes of unfinished files already on disk, by file."""
        self.repo = repo
        self.listener = listener
        self.bytes_total = bytes_total
        self.files_total = files_total
        self.bytes_done = bytes_done
        self.files_done = files_done
        self._per_file: dict[str, int] = dict(parts or {})
        self.current_file: str | None = None
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._received: deque[tuple[float, int]] = deque()  # (time, bytes received this run so far)
        self._received_total = 0
        self._last_report = float("-inf")

    def add(self, nbytes: int, filename: str) -> None:
        """Bytes written to disk (negative when the library rewinds a file it must fetch again)."""
        if self.cancelled.is_set():
            # Raised inside the library's download loop: the other downloads stop at their next chunk.
            raise DownloadCancelled
        with self._lock:
            self.bytes_done += nbytes
            self._per_file[filename] = self._per_file.get(filename, 0) + nbytes
            self._received_total += nbytes
            self.current_file = filename
            self._report(force=False)

    def file_done(self, filename: str, size: int) -> None:
        """A file is in place: it counts `size` bytes, whatever passed through `add` (nothing, for a file whose
        blob another revision already brought)."""
        with self._lock:
            self.bytes_done += size - self._per_file.pop(filename, 0)
            self.files_done += 1
            self.current_file = filename
            self._report(force=self.files_done >= self.files_total)

    def report(self) -> None:
        with self._lock:
            self._report(force=True)

    def snapshot(self) -> PullProgress:
        now = time.monotonic()
        self._received.append((now, self._received_total))
        while len(self._received) > 2 and now - self._received[1][0] >= RATE_WINDOW_S:
            self._received.popleft()
        first_time, first_bytes = self._received[0]
        elapsed = now - first_time
        rate = max(0.0, (self._received_total - first_bytes) / elapsed) if elapsed > 0.05 else 0.0
        left = max(0, self.bytes_total - self.bytes_done)
        eta = left / rate if rate > 0 else (0.0 if not left else None)
        return PullProgress(
            repo=self.repo,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            files_done=self.files_done,
            files_total=self.files_total,
            current_file=self.current_file,
            bytes_per_second=rate,
            eta_seconds=eta,
        )

    def _report(self, *, force: bool) -> None:
        now = time.monotonic()
        if self.listener is None or (not force and now - self._last_report < REPORT_INTERVAL_S):
            return
        self._last_report = now
        self.listener(self.snapshot())


class DownloadCancelled(Exception):
    """Another file of the same pull failed, or the pull was interrupted: stop this download, keep its part."""
