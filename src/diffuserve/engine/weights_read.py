"""safetensors files read straight into tensors on a device: many threads, each reading byte ranges into
pinned host buffers and copying them on a stream of its own, where one thread copying tensor by tensor from a
memory map reaches a fraction of the page cache's and the bus's rates."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from diffuserve.engine.grouping import grouped_by_size

# safetensors' dtype names (its format's specification).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CHUNK = 64 << 20  # bytes one read moves: large enough for the disk, small enough to double-buffer per thread
THREADS = 8


class WeightsFormatError(ValueError):
    """The file is not a safetensors file this reader understands (the caller loads it another way)."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int


def entries(path: Path) -> list[Entry]:
    """The tensors a safetensors file holds, from its header (an 8-byte length, then JSON), in file order."""
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise WeightsFormatError(f"{path}: too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > 100 << 20:
            raise WeightsFormatError(f"{path}: header of {length} bytes")
        try:
            header = json.loads(file.read(length))
        except ValueError as exc:
            raise WeightsFormatError(f"{path}: header is not JSON ({exc})") from exc
    base = 8 + length
    found = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise WeightsFormatError(f"{path}: {name} has dtype {info.get('dtype')}, unknown here")
        start, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        if end - start != math.prod(shape) * dtype.itemsize or start < 0:
            raise WeightsFormatError(f"{path}: {name} spans {end - start} bytes, not what its shape holds")
        found.append(Entry(name, dtype, shape, base + start, base + end))
    found.sort(key=lambda entry: entry.start)
    # As safetensors itself demands: the tensors' bytes follow one another from the header on, no gap or overlap.
    for before, after in zip([None, *found], found, strict=False):
        if after.start != (before.end if before else base):
            raise WeightsFormatError(f"{path}: {after.name} does not start where the bytes before it end")
    return found


def resolved_device(device: str | torch.device) -> torch.device:
    """`cuda` as the caller's current CUDA device (a worker's, set with set_device), so every spelling of one
    device compares equal and a thread started later still reads onto it."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def read_tensors(
    paths: list[Path], device: str | torch.device, threads: int = THREADS
) -> dict[str, torch.Tensor]:
    """Every tensor of `paths` on `device`, each its own allocation (so a later replacement of one frees it).
    On CUDA the bytes go through pinned buffers; on CPU they are read straight into the tensors."""
    # The caller's current device, resolved here: the reading threads start on device 0.
    device = resolved_device(device)
    tensors: dict[str, torch.Tensor] = {}
    pieces: list[tuple[Path, list[tuple[torch.Tensor, Entry]]]] = []
    for path in paths:
        listed = entries(path)
        for entry in listed:
            if entry.name in tensors:
                raise WeightsFormatError(f"{entry.name} is in more than one file")
            tensors[entry.name] = torch.empty(entry.shape, dtype=entry.dtype, device=device)
        items = [(tensors[e.name], e) for e in listed]
        # Consecutive tensors read together, about CHUNK bytes a read (a larger tensor alone, split by the copy).
        pieces += [
            (path, group) for group in grouped_by_size(items, lambda item: item[1].end - item[1].start, CHUNK)
        ]
    if device.type == "cuda":
        _copy_through_pinned(pieces, device, threads)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda piece: _read_into_host(*piece), pieces))
    return tensors


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor.new_empty(0, dtype=torch.uint8)


def _host_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a host tensor as a buffer a read can fill."""
    return memoryview(_as_bytes(tensor).numpy().data)


def _read_into_host(path: Path, group: list[tuple[torch.Tensor, Entry]]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for tensor, entry in group:
            _pread_exact(fd, _host_view(tensor), entry.start, path)
    finally:
        os.close(fd)


def _pread_exact(fd: int, into: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(into):
        count = os.preadv(fd, [into[done:]], offset + done)
        if count <= 0:
            raise WeightsFormatError(f"{path}: ends before its header says")
        done += count


def _copy_through_pinned(
    pieces: list[tuple[Path, list[tuple[torch.Tensor, Entry]]]], device: torch.device, threads: int
) -> None:
    """Each thread: two pinned buffers and a stream of its own; it reads a group's bytes (one read of its
    range, or CHUNK-sized reads of a larger tensor) into one buffer while the other buffer's copies run."""
    queue = list(reversed(pieces))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        try:
            with torch.cuda.device(device):
                _copy_queue(queue, lock, failures, device)
        except BaseException as exc:  # re-raised in the caller's thread
            failures.append(exc)

    count = max(1, min(threads, len(pieces)))
    workers = [threading.Thread(target=work, name=f"weights-{i}") for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    torch.cuda.synchronize(device)


def _copy_queue(
    queue: list[tuple[Path, list[tuple[torch.Tensor, Entry]]]],
    lock: threading.Lock,
    failures: list[BaseException],
    device: torch.device,
) -> None:
    stream = torch.cuda.Stream(device)
    buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    views = [_host_view(buffer) for buffer in buffers]
    copied: list[torch.cuda.Event | None] = [None, None]
    turn = 0

    def fill(fd: int, path: Path, start: int, length: int) -> int:
        """Read into the next buffer once its last copies are done; returns the buffer's index."""
        nonlocal turn
        index, turn = turn, turn ^ 1
        event = copied[index]
        if event is not None:
            event.synchronize()
        _pread_exact(fd, views[index][:length], start, path)
        return index

    def copies_done(index: int) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        copied[index] = event

    while not failures:
        with lock:
            if not queue:
                break
            path, group = queue.pop()
        fd = os.open(path, os.O_RDONLY)
        try:
            first, last = group[0][1], group[-1][1]
            if last.end - first.start <= CHUNK:  # the group's range in one read
                index = fill(fd, path, first.start, last.end - first.start)
                with torch.cuda.stream(stream):
                    for tensor, entry in group:
                        at = entry.start - first.start
                        _as_bytes(tensor).copy_(
                            buffers[index][at : at + entry.end - entry.start], non_blocking=True
                        )
                    copies_done(index)
                continue
            # A tensor larger than a buffer (or a group with gaps): piece by piece.
            for tensor, entry in group:
                target = _as_bytes(tensor)
                for offset in range(0, entry.end - entry.start, CHUNK):
                    length = min(CHUNK, entry.end - entry.start - offset)
                    index = fill(fd, path, entry.start + offset, length)
                    with torch.cuda.stream(stream):
                        target[offset : offset + length].copy_(buffers[index][:length], non_blocking=True)
                        copies_done(index)
        finally:
            os.close(fd)
    stream.synchronize()
