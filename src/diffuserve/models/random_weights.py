"""Random-weight mode: the real architectures of every served family, built with random weights directly on the
device; the repo id names the family, and each component's parameter count is checked against the release."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

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


def _builders() -> dict[str, Callable[..., Any]]:
    from diffuserve.models import arch_qwen3, arch_qwen_image, arch_sd3, architectures

    a, sd3, qwen, q3 = architectures, arch_sd3, arch_qwen_image, arch_qwen3
    return {
        "flux-dev": lambda **kw: a.build_flux(a.FLUX_DEV, **kw),
        "flux-schnell": lambda **kw: a.build_flux(a.FLUX_SCHNELL, **kw),
        "flux-kontext": lambda **kw: a.build_flux(a.FLUX_KONTEXT, pipeline_class="FluxKontextPipeline", **kw),
        "sdxl": lambda **kw: a.build_sdxl(a.SDXL, **kw),
        "sd35-large": lambda **kw: sd3.build_sd3(sd3.SD35_LARGE, **kw),
        "sd35-medium": lambda **kw: sd3.build_sd3(sd3.SD35_MEDIUM, **kw),
        "qwen-image": lambda **kw: qwen.build_qwen_image(qwen.QWEN_IMAGE, **kw),
        "qwen-image-edit": lambda **kw: qwen.build_qwen_image(qwen.QWEN_IMAGE, edit=True, **kw),
        "z-image-turbo": lambda **kw: q3.build_z_image(q3.Z_IMAGE_TURBO, **kw),
        "flux2-klein": lambda **kw: q3.build_flux2_klein(q3.FLUX2_KLEIN_4B, **kw),
    }


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

    Tokenizers are the project's word-level ones (no download): ids stay inside the real vocabularies (CLIP's
    49408, T5's 32128, Qwen's 151936) and the pipelines pad to the real lengths (77, the T5 and Qwen
    max_sequence_length, Qwen's chat templates with the real prefix lengths), so the text encoders do the
    same work as with the real tokenizers; only the words → ids mapping differs.
    """
    arch = arch_for_repo(repo)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    pipeline = _builders()[arch](device=device, dtype=dtype)
    report = param_report(pipeline, arch)
    for name, (actual, expected, ok) in report.items():
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "random %s %s: %.4g params (reference %.4g)", arch, name, actual, expected)
    if not all(ok for _, _, ok in report.values()):
        raise RuntimeError(f"random {arch} does not match the reference parameter counts: {report}")
    return pipeline
