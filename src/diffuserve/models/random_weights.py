"""Random-weight mode: the real FLUX.1 / SDXL architectures built with random weights directly on the device."""

from __future__ import annotations

import logging
from typing import Any

import torch

from diffuserve.models.architectures import FLUX_DEV, FLUX_SCHNELL, SDXL, build_flux, build_sdxl

log = logging.getLogger(__name__)

# Parameter counts of the released models' configs; a build that misses one by more than 0.1 % is wrong (the counts are rounded to 4 digits).
EXPECTED_PARAMS: dict[str, dict[str, float]] = {
    "flux-dev": {"transformer": 11.90e9, "vae": 83.82e6, "text_encoder": 123.06e6, "text_encoder_2": 4.762e9},
    "flux-schnell": {
        "transformer": 11.89e9,
        "vae": 83.82e6,
        "text_encoder": 123.06e6,
        "text_encoder_2": 4.762e9,
    },
    "sdxl": {"unet": 2.567e9, "vae": 83.65e6, "text_encoder": 123.06e6, "text_encoder_2": 694.66e6},
}
PARAM_TOLERANCE = 0.001


def arch_for_repo(repo: str) -> str:
    """flux-dev, flux-schnell or sdxl from the repo id; anything else is refused with the choices."""
    lowered = repo.lower()
    if "flux" in lowered and "schnell" in lowered:
        return "flux-schnell"
    if "flux" in lowered:
        return "flux-dev"
    if "xl" in lowered:
        return "sdxl"
    raise ValueError(
        f"--weights random knows FLUX.1-dev, FLUX.1-schnell and SDXL; {repo!r} names none of them "
        "(e.g. black-forest-labs/FLUX.1-dev, black-forest-labs/FLUX.1-schnell, "
        "stabilityai/stable-diffusion-xl-base-1.0)"
    )


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_report(pipeline: Any, arch: str) -> dict[str, tuple[int, float, bool]]:
    """Per component: (params, expected, within tolerance)."""
    report = {}
    for name, expected in EXPECTED_PARAMS[arch].items():
        actual = count_params(getattr(pipeline, name))
        report[name] = (actual, expected, abs(actual - expected) / expected <= PARAM_TOLERANCE)
    return report


def build_random_pipeline(repo: str, *, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """The real architecture named by `repo`, random weights made on `device` in `dtype` (meta: no memory).

    Tokenizers are the project's word-level ones (no download): ids stay inside CLIP's 49408 and T5's 32128
    vocabularies and the pipelines pad to the real lengths (77, and 256/512 for T5), so the text encoders do
    the same work as with the real tokenizers; only the words → ids mapping differs.
    """
    arch = arch_for_repo(repo)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    if arch == "sdxl":
        pipeline = build_sdxl(SDXL, device=device, dtype=dtype)
    else:
        spec = FLUX_DEV if arch == "flux-dev" else FLUX_SCHNELL
        pipeline = build_flux(spec, device=device, dtype=dtype)
    report = param_report(pipeline, arch)
    for name, (actual, expected, ok) in report.items():
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "random %s %s: %.4g params (reference %.4g)", arch, name, actual, expected)
    if not all(ok for _, _, ok in report.values()):
        raise RuntimeError(f"random {arch} does not match the reference parameter counts: {report}")
    return pipeline
