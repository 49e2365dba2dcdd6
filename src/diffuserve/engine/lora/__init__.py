"""Adapters (LoRA) per request: the engine's side, slots of adapter weights in every adapted layer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from diffuserve.engine.lora.slots import AdapterSet, LoraSlots
from diffuserve.engine.lora.targets import hosts, lora_targets
from diffuserve.engine.lora.weights import AdapterCache, LoadedAdapter
from diffuserve.types import BatchJob

log = logging.getLogger(__name__)

__all__ = ["AdapterReport", "AdapterUnavailable", "EngineAdapters", "lora_targets"]


class AdapterUnavailable(RuntimeError):
    """An adapter a request names cannot be used by the time its batch runs (its file changed or went)."""


@dataclass
class AdapterReport:
    """What a batch's adapters cost: files read (name → seconds), cache hits, slots written, seconds spent."""

    loaded: dict[str, float] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    slots_written: int = 0
    seconds: float = 0.0


class EngineAdapters:
    """Install once, after the tier and before compile runs; then `prepare` each batch before its call."""

    def __init__(
        self,
        model: nn.Module,
        targets: dict[str, tuple[int, int]],
        *,
        max_rank: int,
        slots: int,
        max_batch: int,
        cache_bytes: int,
    ) -> None:
        host_layers = hosts(model, targets)
        # A pipeline with classifier-free guidance in one call runs each image twice (negative, positive), an
        # instruct-style one three times: the row buffer has room for four.
        self.slots = LoraSlots(host_layers, slots, max_rank, max_rows=4 * max_batch)
        self.targets = {part: targets[part] for part in self.slots.parts}
        weight = host_layers[0].module.weight if host_layers else None
        dtype = getattr(model, "dtype", torch.float32)
        device = weight.device if weight is not None else torch.device("cpu")
        self.cache = AdapterCache(cache_bytes, device, dtype, self.targets, max_rank)
        log.info(
            "adapters: %d layers, rank up to %d, %d slots (%.0f MiB on %s)",
            len(host_layers),
            max_rank,
            slots,
            self.slots.nbytes / 2**20,
            device,
        )

    def preload(self, paths: tuple[str, ...]) -> None:
        """The adapters named at start, into the cache; one this model cannot take (another model's, where a
        server has several) is left out: a request naming it gets the server's 400."""
        for path in paths:
            try:
                _, adapter, _ = self.cache.get(path)
            except (OSError, ValueError) as exc:
                log.info("adapter %s not read ahead for this model: %s", path, exc)
                continue
            log.info("adapter %s read in %.0f ms", path, adapter.load_s * 1000)

    def prepare(self, job: BatchJob) -> AdapterReport:
        """Each image row points at a slot that holds its request's adapters; reads the files not cached."""
        started = time.perf_counter()
        report = AdapterReport()
        loaded: dict[str, LoadedAdapter] = {}
        per_item: list[AdapterSet] = []
        for item in job.items:
            adapters = []
            for use in item.loras:
                try:
                    identity, adapter, hit = self.cache.get(use.path)
                except (OSError, ValueError) as exc:  # AdapterError is a ValueError
                    # Checked when the request came; the file changed or went since. Its name, not its path.
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    raise AdapterUnavailable(f"adapter {use.name!r} cannot be read now: {reason}") from None
                if identity not in loaded and hit and use.name not in report.hits:
                    report.hits.append(use.name)  # once per batch, as the metric counts
                elif not hit:
                    report.loaded[use.name] = adapter.load_s
                loaded[identity] = adapter
                adapters.append((identity, use.scale))
            per_item.append(tuple(adapters))
        per_image = [adapters for item, adapters in zip(job.items, per_item, strict=True) for _ in item.seeds]
        try:
            report.slots_written = self.slots.place(per_image, loaded)
        except ValueError as exc:
            raise AdapterUnavailable(str(exc)) from None
        report.seconds = time.perf_counter() - started
        return report
