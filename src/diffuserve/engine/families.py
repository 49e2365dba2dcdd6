"""Model families and their defaults (steps, guidance, text length, native size), detected from a pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    default_steps: int
    default_guidance: float
    max_sequence_length: int | None
    supports_negative_prompt: bool
    native_size: int
    size_multiple: int
    min_size: int
    max_size: int
    max_steps: int = 200


FLUX_SCHNELL = Family("flux-schnell", 4, 0.0, 256, False, 1024, 16, 256, 2048)
FLUX_DEV = Family("flux-dev", 28, 3.5, 512, False, 1024, 16, 256, 2048)
SDXL = Family("sdxl", 30, 5.0, None, True, 1024, 8, 256, 2048)
GENERIC = Family("generic", 30, 7.5, None, True, 512, 8, 64, 2048)
# The built-in models: 32×32 digits, small enough for a laptop CPU.
TINY_FLUX = Family("tiny-flux", 4, 0.0, 16, False, 32, 16, 16, 256)

FAMILIES = {f.name: f for f in (FLUX_SCHNELL, FLUX_DEV, SDXL, GENERIC, TINY_FLUX)}


def detect_family(pipeline_class: str, repo: str, guidance_embeds: bool | None = None) -> Family:
    """Pick defaults from the pipeline class and repo name; FLUX dev vs schnell by the guidance embedding."""
    lowered = repo.lower()
    if pipeline_class.startswith("Flux"):
        if "schnell" in lowered:
            return FLUX_SCHNELL
        if "dev" in lowered:
            return FLUX_DEV
        return FLUX_DEV if guidance_embeds else FLUX_SCHNELL
    if pipeline_class.startswith("StableDiffusionXL"):
        return SDXL
    return GENERIC
