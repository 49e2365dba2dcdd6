"""A stand-in engine for the real worker loop (`worker_main`), without torch or a model.

`FakeEngine` is what the pool's `engine_factory` makes in each spawned worker (a module-level class, so a spawned
process can import it). Its model repo picks how it starts:
- `fake`: ready at once;
- `fake-slow-loading`: loads only once a file `loaded` exists in its cache dir (the test decides when the model
  is in);
- `fake-failing`: cannot load its model and says so;
- `fake-crashing`: dies while loading without a word, as a segfault or the OOM killer would leave it;
- `fake-flapping`: gets ready, then dies at once (and so does every replacement);
- `fake-group-failing`: a group whose last rank cannot load; the others wait, as at a rendezvous;
- `fake-rendezvous-race`: a group whose first start fails at the rendezvous (its port was taken), as
  `join_group` reports it; the group started again serves (a marker under the cache dir remembers);
- `fake-warming`: each batch size has its own code, as compiled code on a GPU: size 1 is warmed before ready,
  each other size once a file `warm-<size>` exists in its cache dir (the test decides when a warm-up ends), and a
  batch of a size not warmed yet is compiled in the request: its images say `compiled-in-request`.

The prompt steers a batch: `hold:<path>` answers once that file exists (the test decides when the worker is free
again) or once its clients left, `fail` answers with an error, `die` exits mid-batch without answering, `die:<r>`
makes group rank r exit (the leader then blocks, as it would inside a collective). Each image's bytes say what
made it: `<prompt>|seed=<seed>|batch=<images in the batch>`, passed through the real encoder stage as an image
the device encoded itself.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffuserve.engine.config import EngineConfig
from diffuserve.engine.loader import model_info
from diffuserve.engine.parallel.group import GroupJoinFailed
from diffuserve.messages import BatchResult, DeviceBatch, GroupRank, StartupPhases, warm_order
from diffuserve.types import TINY_FLUX, BatchJob, ModelInfo

HOLD_LIMIT_S = 30.0  # a test that forgets to release its worker fails instead of hanging


class FakeEngine:
    def __init__(self, config: EngineConfig, device: str, group: GroupRank | None = None) -> None:
        self.config, self.device, self.group = config, device, group
        self.rank = group.rank if group is not None else 0
        self.phases = StartupPhases()
        self.broken = False
        self.warmed: set[int] = set()
        self.on_phase: Callable[[str, str], None] = lambda phase, detail: None  # the worker sets its own

    def load(self) -> ModelInfo:
        mode, group = self.config.model_repo, self.group
        self.on_phase("loading", "")
        if mode == "fake-failing":
            raise OSError("no model at /nowhere")
        if mode == "fake-crashing":
            os._exit(3)
        if mode == "fake-slow-loading":
            _wait_for(Path(self.config.cache_dir) / "loaded", None)
        if mode == "fake-group-failing" and group is not None:
            if self.rank == group.world_size - 1:
                raise RuntimeError(f"no room on {self.device}")
            time.sleep(HOLD_LIMIT_S)
        if mode == "fake-rendezvous-race" and group is not None and group.leader:
            marker = Path(self.config.cache_dir) / "rendezvous"
            if not marker.exists():
                marker.touch()
                raise GroupJoinFailed(
                    f"DistNetworkError: The server socket has failed to listen on port {group.port}"
                )
        parallel = group.world_size if group is not None else 1
        return model_info(self.config, TINY_FLUX, parallel=parallel)

    @property
    def sizes_specialised(self) -> bool:
        return self.config.model_repo == "fake-warming"

    def warmup_sizes(self) -> list[int]:
        top = self.config.max_batch
        return warm_order(top) if self.sizes_specialised else [top]

    def warm(self, size: int) -> DeviceBatch | None:
        if self.sizes_specialised and size > 1:
            _wait_for(Path(self.config.cache_dir) / f"warm-{size}", None)
        self.phases.warmup_s[size] = 0.01
        self.warmed.add(size)
        return None

    def save_compile_cache(self) -> str | None:
        if self.config.model_repo == "fake-flapping":
            # Dies just after the worker said it is ready.
            threading.Timer(0.05, os._exit, args=(4,)).start()
        if not self.sizes_specialised:
            return None  # nothing compiled, as on CPU
        # Like compiled code on a GPU: its artefacts written once every size is warm.
        path = Path(self.config.cache_dir) / "compile" / "fake.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"sizes {sorted(self.warmed)}".encode())
        self.phases.compile_cache_save_s = 0.02
        return str(path)

    def compute(
        self,
        job: BatchJob,
        cancelled: Callable[[], bool] | None = None,
        on_preview: Any = None,
        on_step: Callable[[int], None] | None = None,
    ) -> DeviceBatch | BatchResult:
        started = time.perf_counter()
        prompts = [item.prompt for item in job.items]
        if f"die:{self.rank}" in prompts or "die" in prompts:
            os._exit(6 if "die" not in prompts else 5)
        if any(prompt.startswith("die:") for prompt in prompts):
            time.sleep(
                HOLD_LIMIT_S
            )  # a peer is gone: stuck, as a rank waiting for it in a collective would be
        for prompt in prompts:
            if prompt.startswith("hold:") and not _wait_for(Path(prompt.removeprefix("hold:")), cancelled):
                return BatchResult(batch_id=job.batch_id, error="cancelled: every client of this batch left")
        if "fail" in prompts:
            return BatchResult(batch_id=job.batch_id, error="RuntimeError: the fake engine was told to fail")
        compiled = (
            "|compiled-in-request" if self.sizes_specialised and job.num_images not in self.warmed else ""
        )
        described = [
            f"{item.prompt}|seed={seed}|batch={job.num_images}{compiled}".encode()
            for item in job.items
            for seed in item.seeds
        ]
        elapsed_ms = (time.perf_counter() - started) * 1000
        pixels = np.zeros((job.num_images, 1, 1, 3), dtype=np.uint8)
        return DeviceBatch(job, pixels, elapsed_ms, 0.0, device_encoded=dict(enumerate(described)))

    def close(self) -> None:
        pass


def _wait_for(path: Path, cancelled: Callable[[], bool] | None) -> bool:
    """Whether the file appeared before the batch was cancelled (or the hold limit passed)."""
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not path.exists() and time.monotonic() < deadline:
        if cancelled is not None and cancelled():
            return False
        time.sleep(0.005)
    return True
