"""Adapters of random weights in diffusers' file format, for a model's adaptable layers: what the tests and
the GPU benchmark serve where no trained adapter of the architecture can be downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_random_adapter(
    path: Path,
    targets: dict[str, tuple[int, int]],
    *,
    rank: int,
    seed: int = 0,
    alpha: float | None = None,
    std: float = 0.02,
    prefix: str = "transformer",
) -> Path:
    """A rank-`rank` adapter on every target layer: A and B Gaussian with `std` (B is not zero, unlike a fresh
    PEFT adapter, so the adapter changes the output), alpha in the file's metadata as diffusers writes it."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (features_in, features_out) in sorted(targets.items()):
        tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, features_in, generator=generator) * std
        tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(features_out, rank, generator=generator) * std
    # A whole LoraConfig, as PEFT needs it to load the file (diffusers passes the metadata to it as is).
    config = {
        f"{prefix}.r": rank,
        f"{prefix}.lora_alpha": alpha if alpha is not None else rank,
        f"{prefix}.target_modules": sorted(targets),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {key: value.to(torch.bfloat16).contiguous() for key, value in tensors.items()},
        str(path),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)},
    )
    return path
