"""A local folder's diffusers models' weights read onto the worker's GPU on a thread as soon as torch is imported,
so the read runs beside the imports of diffusers and transformers; the load (engine.direct_load) then takes the
tensors instead of reading them."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffuserve.engine.direct_load import diffusers_models, model_files, stored_dtypes
from diffuserve.engine.weights_read import read_tensors, resolved_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EarlyReadDone:
    """What the load took from an early read: its gigabytes, the seconds the whole read took on its thread, and how
    long the load waited for it."""

    gigabytes: float
    seconds: float
    waited_s: float


class EarlyRead:
    """One thread reading each listed component's files (largest first) into tensors on `device`; a component's
    tensors, or the error its read met, wait for the load to take them."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, files: dict[str, list[Path]]):
        self.folder, self.device, self.dtype = folder, device, dtype
        self.sizes = {name: sum(f.stat().st_size for f in paths) for name, paths in files.items()}
        self.files = dict(sorted(files.items(), key=lambda item: -self.sizes[item[0]]))
        self.bytes = sum(self.sizes.values())
        self.seconds = 0.0
        self.waited_s = 0.0
        self.taken: list[str] = []
        self._results: dict[str, dict[str, torch.Tensor] | Exception] = {}
        self._thread = threading.Thread(target=self._read_all, name="weights-early", daemon=True)

    def start(self) -> EarlyRead:
        self._thread.start()
        return self

    def _read_all(self) -> None:
        started = time.perf_counter()
        for name, files in self.files.items():
            try:
                self._results[name] = read_tensors(files, self.device)
            except Exception as exc:  # the load decides what it means (it reads again, or reports it)
                self._results[name] = exc
                if isinstance(exc, torch.OutOfMemoryError):
                    break  # no room for the rest either
        self.seconds = time.perf_counter() - started
        log.info(
            "weights read beside the imports: %.1f GB (%s) onto %s in %.1f s (%.1f GB/s)",
            self.bytes / 1e9, ", ".join(self.files), self.device, self.seconds,
            self.bytes / 1e9 / max(self.seconds, 1e-9),
        )  # fmt: skip

    def take(self, name: str) -> dict[str, torch.Tensor] | None:
        """`name`'s tensors, once the read is done (they are handed over: a second take gets None); None where
        it was not read early or its read failed in a way the load meets again in its own words. Running out
        of memory is raised: a second read would not fit either."""
        if self._thread.is_alive():
            started = time.perf_counter()
            self._thread.join()
            self.waited_s += time.perf_counter() - started
        result = self._results.pop(name, None)
        if isinstance(result, torch.OutOfMemoryError):
            raise result
        if isinstance(result, Exception):
            log.info("%s: read early failed (%s: %s); read again", name, type(result).__name__, result)
            return None
        if result is not None:
            self.taken.append(name)
        return result

    def discard(self) -> EarlyReadDone | None:
        """Wait for the read and drop what the load did not take (its memory freed); what the load took from it,
        None where nothing."""
        self._thread.join()
        self._results.clear()
        if not self.taken:
            return None
        taken = sum(self.sizes[name] for name in self.taken)
        return EarlyReadDone(taken / 1e9, self.seconds, self.waited_s)


# The read this process started ahead of its load; the load takes it (one model per worker process).
_pending: EarlyRead | None = None


def start_early_read(path: str, device: str, dtype: torch.dtype) -> EarlyRead | None:
    """Start reading the diffusers models of the pipeline folder at `path` onto `device` in the background,
    those the direct load can fill (stored in `dtype`, the files diffusers would load); None where there is
    nothing such (not a pipeline folder, every model stored in another dtype). A CUDA `device` becomes this
    process's current device."""
    global _pending
    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        return None
    files: dict[str, list[Path]] = {}
    for name in diffusers_models(folder):
        found = model_files(folder / name)
        try:
            if found is not None and not stored_dtypes(found) - {dtype}:
                files[name] = found
        except (OSError, ValueError) as exc:  # the load reports a file it cannot read in its own words
            log.debug("%s: not read early (%s)", name, exc)
    if not files:
        return None
    target = resolved_device(device)
    if target.type == "cuda":
        # This process's GPU, as the worker sets it later anyway: CUDA initialises here, on the caller's thread,
        # not in a reading thread beside the imports, and nothing it creates lands on another GPU.
        torch.cuda.set_device(target)
    _pending = EarlyRead(folder.resolve(), target, dtype, files).start()
    return _pending


def take_early_read(path: str, device: str, dtype: torch.dtype) -> EarlyRead | None:
    """The read started early for this folder, device and dtype, handed over once; a read for anything else
    is dropped (its memory freed) and None returned."""
    global _pending
    early, _pending = _pending, None
    if early is None:
        return None
    if (early.folder, early.device, early.dtype) != (
        Path(path).expanduser().resolve(),
        resolved_device(device),
        dtype,
    ):
        early.discard()
        return None
    return early
