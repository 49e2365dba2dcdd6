"""Random-weight mode: the real architectures of every served family, built with random weights directly on the
device; the repo id names the family, and each component's parameter count is checked against the release."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from diffuserve.models.released import (
    EXAMPLE_REPOS,
    EXPECTED_PARAMS,
    PARAM_TOLERANCE,
    PUBLISHED_PARAMS,
    RELEASED_REPOS,
    arch_for_repo,
)

__all__ = [
    "EXAMPLE_REPOS",
    "EXPECTED_PARAMS",
    "PARAM_TOLERANCE",
    "PUBLISHED_PARAMS",
    "RELEASED_REPOS",
    "arch_for_repo",
    "build_random_pipeline",
    "count_params",
]

log = logging.getLogger(__name__)


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
