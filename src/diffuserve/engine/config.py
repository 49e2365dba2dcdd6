"""What a worker's engine is told: the model and how to run it (never the server's settings or secrets)."""

from __future__ import annotations

from dataclasses import dataclass

from diffuserve.types import StrChoice, Tier


class Weights(StrChoice):
    PRETRAINED = "pretrained"
    RANDOM = "random"


class DType(StrChoice):
    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class CudaGraphs(StrChoice):
    AUTO = "auto"
    OFF = "off"


class Fp8Rounding(StrChoice):
    """How tier L rounds weights to fp8: each to its nearest value, or by GPTQ on calibration calls (cached)."""

    NEAREST = "nearest"
    CALIBRATED = "calibrated"


class ParallelAttention(StrChoice):
    AUTO = "auto"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine and its worker process use, built by the serving layer from the settings."""

    model_repo: str
    # The name clients use for this model (the server resolved it from MODEL_NAME or the repo, tier and batch).
    model_name: str
    # A hub model's folder in the cache, found by the server once it is there: the weights are read from it
    # without asking the hub again (a worker restarts while the hub is down). None: load `model_repo` itself.
    model_path: str | None = None
    tier: Tier = Tier.XL
    max_batch: int = 4
    weights: Weights = Weights.PRETRAINED
    dtype: DType = DType.AUTO
    # Compile caches and other artefacts of this model.
    cache_dir: str = "~/.cache/diffuserve"
    warmup: bool = True
    cuda_graphs: CudaGraphs = CudaGraphs.AUTO
    fp8_rounding: Fp8Rounding = Fp8Rounding.NEAREST
    parallel_attention: ParallelAttention = ParallelAttention.AUTO
    parallel_decode: bool = True
    # Adapters (LoRA): the most rank per layer (0: none), the slots per layer (0: MODEL_BATCH + 1), the bytes of
    # adapter weights kept on the device, and the files read into that cache at start.
    lora_max_rank: int = 0
    lora_slots: int = 0
    lora_cache_bytes: int = 2**30
    lora_preload: tuple[str, ...] = ()
    # Bytes of text-encoder outputs kept on the device by prompt (0: none).
    prompt_cache_bytes: int = 0
    # How the worker process logs: as the server does.
    log_format: str = "text"
    log_level: str = "info"
