"""A request's adapters resolved before it queues: each named one found, read (its header) and checked against
the model, so that a bad adapter is the client's 400 and never reaches a worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from diffuserve.config import Settings
from diffuserve.errors import InvalidRequest
from diffuserve.hub import DownloadCancelled, PullProgress, log_progress, pull_adapter
from diffuserve.loras.catalog import LoraCatalog
from diffuserve.loras.files import AdapterError, check_layout, read_layout
from diffuserve.serving.engine_config import adapters_enabled
from diffuserve.types import LoraUse, ModelInfo

log = logging.getLogger(__name__)


class AdapterResolver:
    def __init__(self, settings: Settings) -> None:
        self.enabled = adapters_enabled(settings)
        self.catalog = LoraCatalog(settings.lora_dir, settings.lora_paths)

    def check_preloaded(self) -> None:
        """The adapters given at start are readable adapter files (checked against a model once it loads);
        raises ValueError naming the one that is not."""
        for name, path in self.catalog.preloaded.items():
            try:
                read_layout(path)
            except AdapterError as exc:
                raise ValueError(f"LORAS (--lora): adapter {name!r} ({path}): {exc}") from None

    def pull_hub(self, token: str | None, stop: threading.Event) -> None:
        """Download the hub adapters named at start into the hub cache (the models' pull code: resumed, offline
        from the cache) and check each; raises PullError or ValueError naming the one that failed. Once `stop`
        is set (the server is stopping) the download ends at its next report, its part kept for a resume."""
        for name, (repo, filename) in self.catalog.hub.items():
            log.info("adapter %s: pulling %s", name, repo + (f":{filename}" if filename else ""))
            report = log_progress(f"adapter {name}", logger=log)

            def progress(done: PullProgress, repo: str = repo, report: Any = report) -> None:
                if stop.is_set():
                    raise DownloadCancelled(repo)
                report(done)

            path = pull_adapter(repo, filename, token=token, progress=progress)
            try:
                self.catalog.layout(path)  # read and checked once: the requests that name it find it cached
            except AdapterError as exc:
                raise ValueError(f"LORAS (--lora): adapter {name!r} ({repo}): {exc}") from None
            self.catalog.provide(name, path)

    def preloaded_paths(self) -> tuple[str, ...]:
        """The files of the adapters named at start that are here (hub ones once pulled), for the workers."""
        return tuple(str(path) for path in self.catalog.preloaded.values())

    def resolve(
        self, model: ModelInfo, wanted: Sequence[tuple[str, str | None, float]]
    ) -> tuple[LoraUse, ...]:
        """The request's adapters for `model`, in its order: (name, weight_name, scale) each. Blocking (file
        reads, cached by the file's size and time): call it off the event loop."""
        if not wanted:
            return ()
        if not self.enabled:
            raise InvalidRequest(
                "this server takes no adapters: start it with LORA_DIR or --lora NAME=PATH", param="loras"
            )
        if not model.lora_max_rank:
            raise InvalidRequest(f"model {model.name} ({model.family}) takes no adapters", param="loras")
        uses: list[LoraUse] = []
        ranks: dict[str, int] = {}
        for index, (name, weight_name, scale) in enumerate(wanted):
            param = f"loras.{index}.name"
            try:
                found = self.catalog.resolve(name, weight_name)
                check_layout(found.layout, model.lora_targets, model.lora_max_rank)
            except AdapterError as exc:
                raise InvalidRequest(f"adapter {_shown(name)}: {exc}", param=param) from None
            for module, lora in found.layout.modules.items():
                ranks[module] = ranks.get(module, 0) + lora.rank
                if ranks[module] > model.lora_max_rank:
                    raise InvalidRequest(
                        f"the adapters' ranks add up to {ranks[module]} in {module!r}, above this server's "
                        f"LORA_MAX_RANK of {model.lora_max_rank}: use fewer adapters together",
                        param=param,
                    )
            uses.append(LoraUse(found.name, found.layout.path, scale))
        return tuple(uses)

    def describe(self, models: Sequence[ModelInfo]) -> list[dict[str, Any]]:
        """Every adapter a request can name, with its rank and size, and the served models that take it."""
        listed: list[dict[str, Any]] = []
        for name in self.catalog.names():
            entry: dict[str, Any] = {"id": name, "object": "lora"}
            try:
                layout = self.catalog.resolve(name).layout
            except AdapterError as exc:
                entry["error"] = str(exc)
                listed.append(entry)
                continue
            entry.update(rank=layout.rank, layers=len(layout.modules), bytes=layout.nbytes)
            entry["models"] = [model.name for model in models if _fits(layout, model)]
            listed.append(entry)
        return listed


def _fits(layout: Any, model: ModelInfo) -> bool:
    try:
        check_layout(layout, model.lora_targets, model.lora_max_rank)
    except AdapterError:
        return False
    return bool(model.lora_max_rank)


def _shown(name: str) -> str:
    return repr(name[:100])
