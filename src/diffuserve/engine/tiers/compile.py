"""Regional torch.compile of the repeated blocks, and the compile cache persisted under the cache dir."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffuserve.engine.tiers.cache_files import write_atomically

log = logging.getLogger(__name__)

# The key of the compile artefacts this process compiled, set by `configure_compile_cache`.
_ARTIFACT_KEY: str | None = None
RECOMPILE_LIMIT = 64


def compile_available(device: str) -> tuple[bool, str]:
    """Inductor's GPU kernels need CUDA and Triton; on CPU the served models don't gain enough to pay the
    minutes of compilation on a laptop, so the CPU path stays eager."""
    from torch.utils._triton import has_triton

    if not device.startswith("cuda"):
        return False, f"no torch.compile on {device} (compiled only for CUDA)"
    if not torch.cuda.is_available() or not has_triton():
        return False, "no CUDA device visible" if not torch.cuda.is_available() else "Triton is not installed"
    return True, ""


def compile_dir(cache_dir: str) -> Path:
    return Path(cache_dir).expanduser() / "compile"


def artifact_key(pipeline: Any, tier: str) -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    raw = f"torch{torch.__version__}-{name}-{type(pipeline).__name__}-{tier}"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # A worker group's ranks compile other graphs (with the collectives of context parallelism): their
        # artefacts must not replace those of one-GPU workers in the same cache dir, or the other way round.
        raw += f"-cp{torch.distributed.get_world_size()}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", raw)


def configure_compile_cache(cache_dir: str, key: str, notes: list[str]) -> None:
    """Point inductor's and Triton's on-disk caches into the cache dir and hot-load saved artefacts, so a second
    start re-traces but does not re-generate or re-build kernels."""
    global _ARTIFACT_KEY
    root = compile_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    # An operator's own setting wins; both are read when the first kernel is compiled, so this is early enough.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    # Static shapes: each batch size gets its own specialised kernels (warm up every served batch size), and
    # many block variants (UNet widths, batch sizes) must not hit the default recompile limit of 8.
    dynamo_config: Any = torch._dynamo.config
    dynamo_config.automatic_dynamic_shapes = False
    for name, value in (
        ("recompile_limit", RECOMPILE_LIMIT),
        ("accumulated_recompile_limit", RECOMPILE_LIMIT * 4),
    ):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))
    # The same seed gives the same image whether this process compiled its kernels or loaded them as artefacts.
    # Otherwise inductor times several configs of each reduction kernel on the device when it first runs and
    # keeps the fastest, a choice that changes how the sums round and that another start can make differently:
    # FLUX.1-schnell's warm start differed from its cold start by up to 6 of 255 without this mode, and gave the
    # same bytes with it, with no slowdown seen; FLUX.1-dev's still differs, cause not found (docs/startup.md).
    # An operator's TORCHINDUCTOR_DETERMINISTIC (read when inductor's config is imported: "1" on, anything
    # else off) wins.
    inductor_config: Any = torch._inductor.config
    if "TORCHINDUCTOR_DETERMINISTIC" not in os.environ and hasattr(inductor_config, "deterministic"):
        inductor_config.deterministic = True
    if getattr(inductor_config, "deterministic", False):
        notes.append("inductor: deterministic mode (one config per reduction kernel: one seed, one image)")
    else:
        notes.append(
            "inductor: deterministic mode off (TORCHINDUCTOR_DETERMINISTIC is not 1, or torch lacks the mode)"
        )
    _ARTIFACT_KEY = key
    path = root / f"{key}.bin"
    if not path.exists():
        notes.append(f"compile cache: none yet at {path} (first start compiles; saved after warm-up)")
        return
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # a stale or foreign file must not stop the server; it is rebuilt on save
        notes.append(f"compile cache {path.name}: not loaded ({type(exc).__name__}: {exc})")
        return
    if info is None:  # torch logs and returns None for a file it cannot read (corrupt, another version)
        notes.append(f"compile cache {path.name}: not loaded (unreadable); rebuilt on save")
        return
    kinds = ", ".join(f"{len(keys)} {kind}" for kind, keys in sorted(info.artifacts.items()))
    notes.append(f"compile cache: loaded {kinds or 'no'} artefacts from {path}")


def save_compile_cache(cache_dir: str) -> str | None:
    """Write this process's compile artefacts under the cache dir (call after warm-up); returns the path, or
    None when nothing was compiled or the write failed (logged: the cache only saves the next start time)."""
    if _ARTIFACT_KEY is None:
        return None
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _info = saved
    path = compile_dir(cache_dir) / f"{_ARTIFACT_KEY}.bin"
    # The GPU workers all save the same key at about the same time; a crash mid-write must never leave a
    # truncated cache for the next start.
    try:
        write_atomically(path, lambda temporary: temporary.write_bytes(data), ".tmp")
    except OSError as exc:
        log.warning("compile cache: not saved to %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    log.info("compile cache: saved %.1f MB to %s", len(data) / 1e6, path)
    return str(path)


def compile_repeated_blocks(model: nn.Module, notes: list[str], *, varying_text: bool = False) -> bool:
    """diffusers' regional compilation: each repeated block class compiles once (the 57 FLUX blocks share two
    graphs), so warm-up costs seconds per graph instead of minutes for the whole model, for nearly the same
    speed. Static shapes (`dynamic=False`): each served batch size gets its own kernels at warm-up. Where the
    prompt's token count varies from call to call (`varying_text`: Qwen-Image pads no prompt), static shapes
    would compile again for every new length: there dynamo's automatic dynamic shapes mark a size that changed
    as symbolic, one recompile in all."""
    names = list(getattr(model, "_repeated_blocks", None) or [])
    compile_blocks = getattr(model, "compile_repeated_blocks", None)
    if not names or compile_blocks is None:
        notes.append(f"torch.compile: skipped, {type(model).__name__} declares no repeated blocks")
        return False
    if varying_text:
        dynamo_config: Any = torch._dynamo.config
        dynamo_config.automatic_dynamic_shapes = True
    try:
        compile_blocks(dynamic=None if varying_text else False)
    except ValueError as exc:  # diffusers: none of the declared block classes is in this model
        notes.append(f"torch.compile: skipped ({exc})")
        return False
    count = sum(type(module).__name__ in names for module in model.modules())
    shapes = ", sizes that change made dynamic (the prompt's length varies)" if varying_text else ""
    notes.append(
        f"torch.compile (regional, diffusers compile_repeated_blocks): {count} blocks of {', '.join(names)}"
        + shapes
    )
    return True
