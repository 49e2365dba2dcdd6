"""The released models that random weights stand for: their repo ids, the parameter counts of their configs and
their announced sizes. No torch here: the server sizes a random-weight model from it before any worker starts."""

from __future__ import annotations

import re

# Parameter counts of the released models' configs (4 significant digits); a build that misses one by more
# than 0.1 % is wrong. Sources of the configs: docs/models.md. PUBLISHED_PARAMS gives the figures the model
# cards announce, to the precision they give them.
_FLUX_PARTS = {"vae": 83.82e6, "text_encoder": 123.06e6, "text_encoder_2": 4.762e9}
_SD3_PARTS = {"vae": 83.82e6, "text_encoder": 123.65e6, "text_encoder_2": 694.66e6, "text_encoder_3": 4.762e9}
EXPECTED_PARAMS: dict[str, dict[str, float]] = {
    "flux-dev": {"transformer": 11.90e9, **_FLUX_PARTS},
    "flux-schnell": {"transformer": 11.89e9, **_FLUX_PARTS},
    "flux-kontext": {"transformer": 11.90e9, **_FLUX_PARTS},
    "sdxl": {"unet": 2.567e9, "vae": 83.65e6, "text_encoder": 123.06e6, "text_encoder_2": 694.66e6},
    "sd35-large": {"transformer": 8.057e9, **_SD3_PARTS},
    "sd35-medium": {"transformer": 2.243e9, **_SD3_PARTS},
    "qwen-image": {"transformer": 20.43e9, "vae": 126.9e6, "text_encoder": 8.292e9},
    "qwen-image-edit": {"transformer": 20.43e9, "vae": 126.9e6, "text_encoder": 8.292e9},
    "z-image-turbo": {"transformer": 6.155e9, "vae": 83.82e6, "text_encoder": 4.022e9},
    "flux2-klein": {"transformer": 3.876e9, "vae": 84.05e6, "text_encoder": 4.022e9},
}
PARAM_TOLERANCE = 0.001
# (announced figure in billions, as written, and where): the denoiser's count must round to it. SD3.5 medium is announced as 2.5 B, but its released
# config gives 2.24 B (SD3-medium's 2.03 B plus the second attention of 13 blocks): the config is what runs.
PUBLISHED_PARAMS: dict[str, tuple[str, str]] = {
    "flux-dev": ("12", "FLUX.1-dev model card: 12 billion parameters"),
    "flux-schnell": ("12", "FLUX.1-schnell model card: 12 billion parameters"),
    "flux-kontext": ("12", "FLUX.1-Kontext-dev model card: 12 billion parameters"),
    "sd35-large": ("8.1", "Stability AI's SD3.5 announcement: 8.1 billion parameters"),
    "qwen-image": ("20", "Qwen-Image model card: a 20B MMDiT"),
    "qwen-image-edit": ("20", "Qwen-Image-Edit model card: built on the 20B Qwen-Image"),
    "z-image-turbo": ("6", "Z-Image-Turbo model card: 6B parameters"),
    "flux2-klein": ("4", "FLUX.2-klein-4B model card: 4B parameters"),
}

# Repo ids → family: the first pattern found in the lower-cased repo id wins.
_REPO_PATTERNS: list[tuple[str, str]] = [
    (r"flux\.1-kontext|flux-kontext|kontext", "flux-kontext"),
    (r"flux\.2-klein-4b|flux2-klein-4b", "flux2-klein"),
    (r"flux.*schnell", "flux-schnell"),
    (r"flux\.1|flux-dev|flux1", "flux-dev"),
    (r"(stable-diffusion|sd)-?3\.5-large", "sd35-large"),
    (r"(stable-diffusion|sd)-?3\.5-medium", "sd35-medium"),
    (r"qwen-image-edit", "qwen-image-edit"),
    (r"qwen-image", "qwen-image"),
    (r"z-image-turbo", "z-image-turbo"),
    (r"xl", "sdxl"),
]
# The released repo of each architecture --weights random builds (its examples, the benchmarks' models).
RELEASED_REPOS: dict[str, str] = {
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-kontext": "black-forest-labs/FLUX.1-Kontext-dev",
    "flux2-klein": "black-forest-labs/FLUX.2-klein-4B",
    "sd35-large": "stabilityai/stable-diffusion-3.5-large",
    "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
    "qwen-image": "Qwen/Qwen-Image",
    "qwen-image-edit": "Qwen/Qwen-Image-Edit",
    "z-image-turbo": "Tongyi-MAI/Z-Image-Turbo",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
EXAMPLE_REPOS = ", ".join(RELEASED_REPOS.values())


def arch_for_repo(repo: str) -> str:
    """The family a repo id names (see _REPO_PATTERNS); anything else is refused with the choices."""
    lowered = repo.lower()
    for pattern, arch in _REPO_PATTERNS:
        if re.search(pattern, lowered):
            return arch
    raise ValueError(f"--weights random knows these models; {repo!r} names none of them: {EXAMPLE_REPOS}")
