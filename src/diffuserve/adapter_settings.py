"""The settings of LoRA adapters (a base of the server's Settings, kept apart for size)."""

from __future__ import annotations

from diffuserve.choices import LoraBatching
from diffuserve.envsettings import EnvSettings, setting


class AdapterSettings(EnvSettings):
    """Where adapters come from and how workers hold them (docs/loras.md); LORAS stays with the server's
    other lists."""

    lora_dir: str | None = setting(
        None,
        "LORA_DIR",
        help="folder of adapters (diffusers' LoRA files) requests name in `loras` (docs/loras.md)",
    )
    lora_max_rank: int = setting(
        64, "LORA_MAX_RANK", help="most rank a request's adapters add up to in one layer", ge=1, le=1024
    )
    lora_slots: int = setting(
        0,
        "LORA_SLOTS",
        help="adapter sets each worker holds ready (0 = MODEL_BATCH + 1; one stays empty)",
        ge=0,
    )
    lora_cache_mb: int = setting(
        1024, "LORA_CACHE_MB", help="most MiB of adapter weights each worker keeps on its device", ge=1
    )
    lora_batching: LoraBatching = setting(
        LoraBatching.MIXED,
        "LORA_BATCHING",
        help="mixed: one batch runs requests of different adapters, each image with its own; split: a batch "
        "holds one adapter set",
    )
