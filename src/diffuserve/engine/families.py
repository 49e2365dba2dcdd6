"""Which known model family a loaded pipeline belongs to (defaults live in diffuserve.types)."""

from __future__ import annotations

from diffuserve.types import FLUX_DEV, FLUX_SCHNELL, GENERIC, SDXL, Family


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
