"""Where each served model runs (DEVICES, or its own MODEL_DEVICES), refused at start when they do not fit."""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from diffuserve.config import Settings
from diffuserve.model_specs import ModelSpec, parse_model_devices
from diffuserve.models.registry import DIGITS_DIR
from diffuserve.models.released import EXPECTED_PARAMS, arch_for_repo
from diffuserve.serving.engine_config import served_model_name
from diffuserve.serving.worker_handle import resolve_devices

log = logging.getLogger(__name__)

GIB = 1 << 30
# Weights may fill this share of a device; the rest is for activations, the VAE decode and CUDA graphs' pools.
WEIGHTS_SHARE = 0.9
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I8": 1,
}


def place_models(
    settings: Settings,
    *,
    weight_bytes: Callable[[ModelSpec, str], int | None] | None = None,
    capacity: Callable[[str], int | None] | None = None,
    gpus_present: bool | None = None,
) -> dict[ModelSpec, list[str]]:
    """Each model's devices. Raises ValueError naming the numbers when the weights placed on one device would
    take more than WEIGHTS_SHARE of its memory (only models whose size can be known beforehand count), and
    when a GPU is asked of a machine that has none."""
    weight_bytes = weight_bytes or (lambda spec, device: estimate_weight_bytes(spec, settings, device))
    capacity = capacity or device_memory_of
    specs = settings.model_specs
    names = {spec: served_model_name(settings, spec) for spec in specs}
    own = parse_model_devices(settings.model_devices)
    placement: dict[ModelSpec, list[str]] = {}
    for model, devices in own.items():
        matches = [spec for spec in specs if model in spec.aliases(names[spec])]
        if len(matches) != 1:
            served = ", ".join(names.values())
            raise ValueError(
                f"MODEL_DEVICES names {model!r}, which is not one served model (served: {served})"
            )
        placement[matches[0]] = resolve_devices(devices)
    shared = resolve_devices(settings.devices)
    placement = {spec: placement.get(spec, shared) for spec in specs}
    gpus = [device for devices in placement.values() for device in devices if device != "cpu"]
    if gpus_present is None:
        gpus_present = bool(glob.glob("/dev/nvidia[0-9]*"))
    if gpus and not gpus_present:
        raise ValueError(f"{gpus[0]} asked for, but this machine has no NVIDIA GPU; use DEVICES=cpu")
    check_fit(placement, names, weight_bytes, capacity)
    return placement


def check_fit(
    placement: dict[ModelSpec, list[str]],
    names: dict[ModelSpec, str],
    weight_bytes: Callable[[ModelSpec, str], int | None],
    capacity: Callable[[str], int | None] | None = None,
) -> None:
    """Raises ValueError, with each model's size and the device's memory, when the weights of the models a
    device holds would take more than WEIGHTS_SHARE of it (models of unknown size are not counted)."""
    memory_of = capacity or device_memory_of
    on_device: dict[str, list[tuple[str, int]]] = {}
    for spec, devices in placement.items():
        for device in dict.fromkeys(devices):
            size = weight_bytes(spec, device)
            if size is not None:
                on_device.setdefault(device, []).append((names[spec], size))
    for device, sized in on_device.items():
        total, room = sum(size for _, size in sized), memory_of(device)
        if room is None:
            continue
        shown = " + ".join(f"{name} {size / GIB:.1f} GiB" for name, size in sized)
        log.info("%s holds %s of weights, of %.1f GiB", device, shown, room / GIB)
        if total <= room * WEIGHTS_SHARE:
            continue
        parts = " + ".join(f"{name} ≈ {size / GIB:.1f} GiB" for name, size in sized)
        advice = "; give each model its own devices with MODEL_DEVICES" if len(sized) > 1 else ""
        raise ValueError(
            f"the models do not fit {device}: {parts} = {total / GIB:.1f} GiB of weights, over "
            f"{WEIGHTS_SHARE:.0%} of its {room / GIB:.1f} GiB{advice}"
        )


def estimate_weight_bytes(spec: ModelSpec, settings: Settings, device: str) -> int | None:
    """The model's weights in memory at the dtype it will run in: random weights from the released config's
    parameter counts, files on disk from their safetensors headers (exact counts); None where neither is known
    (a hub model still to be pulled, an unknown architecture)."""
    if settings.weights == "random":
        try:
            params = int(sum(EXPECTED_PARAMS[arch_for_repo(spec.repo)].values()))
        except (ValueError, KeyError):
            return None
    else:
        folder = _local_folder(spec.repo, settings)
        if folder is None:
            return None
        params = sum(count for path in folder.rglob("*.safetensors") for count in _tensor_counts(path))
        if not params:
            return None
    if settings.dtype == "auto":
        # bf16 on a GPU, fp32 on the CPU (engine.loader.resolve_dtype)
        return params * (2 if device.startswith("cuda") else 4)
    return params * {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(settings.dtype), 2)


def _local_folder(repo: str, settings: Settings) -> Path | None:
    if repo == "digits":
        return DIGITS_DIR
    path = Path(repo).expanduser()
    if path.is_dir():
        return path
    if "/" not in repo or repo.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True, cache_dir=_hub_cache(settings)))
    except Exception:  # not in the cache (or no hub library): the size is not known before the pull
        return None


def _hub_cache(settings: Settings) -> str | None:
    return os.path.join(settings.hf_home, "hub") if settings.hf_home else None


def _tensor_counts(path: Path) -> list[int]:
    """The element count of every tensor in a safetensors file, from its JSON header alone."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (OSError, ValueError, struct.error):
        return []
    counts = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry.get("shape", []):
            count *= int(dim)
        counts.append(count)
    return counts


def device_memory_of(device: str) -> int | None:
    """Total memory of a device in bytes: the GPU's (NVML, no CUDA context in this process), else the host's."""
    if device == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(device.partition(":")[2] or 0)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = int(visible.split(",")[index])
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total)
    except Exception:  # no NVML (CPU install), a UUID in CUDA_VISIBLE_DEVICES …: not checked
        return None
