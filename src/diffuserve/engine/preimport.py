"""The modules a GPU tier needs after the load (the compiler, fp8 quantization), imported on a thread while the
weights load: the load waits on the disk and the copy engine, imports on the interpreter."""

from __future__ import annotations

import importlib
import logging
import threading
import time

from diffuserve.engine.tiers.recipes import recipe_for
from diffuserve.types import Tier

log = logging.getLogger(__name__)

# inductor's compiler (torch imports it at the first compile) and torchao's quantization API: seconds each on
# the GPU machines' CPUs, paid in the accelerating and warming phases when not taken here.
COMPILER = "torch._inductor.compile_fx"
FP8 = "torchao.quantization"


def tier_modules(tier: Tier | str, device: str) -> list[str]:
    """What `tier` imports after the load on `device`; nothing off CUDA, where the load is short."""
    if not device.startswith("cuda"):
        return []
    recipe = recipe_for(tier)
    return [*([FP8] if recipe.fp8 else []), *([COMPILER] if recipe.compile else [])]


def start_preimport(modules: list[str]) -> threading.Thread | None:
    if not modules:
        return None
    thread = threading.Thread(target=import_all, args=(modules,), name="tier-imports", daemon=True)
    thread.start()
    return thread


def import_all(modules: list[str]) -> None:
    """Import each module; a failure is left for the phase that needs it, which reports it with its context."""
    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:
            log.debug("tier import %s failed ahead of its use: %s", name, exc)
            continue
        log.debug("imported %s during the load in %.1f s", name, time.perf_counter() - started)
