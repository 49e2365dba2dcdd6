"""Adapter weights on the worker's device: read from their files once, kept in a cache bounded in bytes."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from diffuserve.loras.files import check_layout, read_layout

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    """Each adapted module's (A, B·alpha/rank), in the model's dtype on its device."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int
    load_s: float


class AdapterCache:
    """Least recently used adapters out first once their bytes pass `max_bytes`. Keyed by file path, size and
    modification time, so a changed file is read again."""

    def __init__(
        self,
        max_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
        targets: dict[str, tuple[int, int]],
        max_rank: int,
    ) -> None:
        # What the layers take: the server checked the file when the request came, but it may have changed since.
        self.targets, self.max_rank = targets, max_rank
        self.max_bytes = max_bytes
        self.device = device
        self.dtype = dtype
        self._held: OrderedDict[tuple[str, int, int], LoadedAdapter] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(adapter.nbytes for adapter in self._held.values())

    def get(self, path: str) -> tuple[str, LoadedAdapter, bool]:
        """The adapter's identity (its file's path and version), the adapter, and whether it was cached
        (False: read from its file now)."""
        stat = Path(path).stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        identity = f"{path}@{stat.st_size}:{stat.st_mtime_ns}"
        adapter = self._held.get(key)
        if adapter is not None:
            self._held.move_to_end(key)
            return identity, adapter, True
        adapter = self._load(path)
        self._held[key] = adapter
        while self.nbytes > self.max_bytes and len(self._held) > 1:
            evicted, _ = self._held.popitem(last=False)
            log.info("adapter %s left the cache (LORA_CACHE_MB)", evicted[0])
        return identity, adapter, False

    def _load(self, path: str) -> LoadedAdapter:
        from safetensors import safe_open

        started = time.perf_counter()
        layout = read_layout(Path(path))
        check_layout(layout, self.targets, self.max_rank)
        modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with safe_open(path, framework="pt", device="cpu") as file:
            for name, module in layout.modules.items():
                down = file.get_tensor(module.down).to(self.device, self.dtype)
                up = (file.get_tensor(module.up).float() * module.scale).to(self.device, self.dtype)
                if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                    raise ValueError(f"adapter {path}: {name} holds values that are not finite numbers")
                modules[name] = (down.contiguous(), up.contiguous())
        nbytes = sum(t.numel() * t.element_size() for pair in modules.values() for t in pair)
        return LoadedAdapter(modules, nbytes, time.perf_counter() - started)
