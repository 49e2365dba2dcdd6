"""Built-in model ids and how each is made: the tiny random FLUX and a tiny version of every other family (built
in code), and the trained digits model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers takes seconds to import; the API process never needs it
    from diffusers import DiffusionPipeline

MODELS_DIR = Path(__file__).resolve().parent
DIGITS_DIR = MODELS_DIR / "digits" / "pipeline"


def _tiny_random() -> DiffusionPipeline:
    from diffuserve.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(seed=0)


def _digits() -> DiffusionPipeline:
    from diffusers import FluxPipeline

    if not (DIGITS_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the digits model's weights are missing from {DIGITS_DIR}; run `make train-digits` to build them"
        )
    return FluxPipeline.from_pretrained(str(DIGITS_DIR))


def _tiny_family(name: str) -> Callable[[], DiffusionPipeline]:
    def build() -> DiffusionPipeline:
        from diffuserve.models.tiny_families import build_tiny_family

        return build_tiny_family(name)

    return build


# The families' tiny versions (models.tiny_families), by the family they stand for.
TINY_FAMILY_MODELS = {
    "tiny-flux-kontext": "FLUX.1 Kontext",
    "tiny-sd35": "Stable Diffusion 3.5",
    "tiny-qwen-image": "Qwen-Image",
    "tiny-qwen-image-edit": "Qwen-Image-Edit",
    "tiny-z-image": "Z-Image-Turbo",
    "tiny-flux2-klein": "FLUX.2 klein",
}
BUILTIN_MODELS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-random": _tiny_random,
    "digits": _digits,
    **{name: _tiny_family(name) for name in TINY_FAMILY_MODELS},
}

BUILTIN_DESCRIPTIONS: dict[str, str] = {
    "tiny-random": "tiny FLUX architecture with seeded random weights (noise images; for wiring tests)",
    "digits": "tiny FLUX trained on scikit-learn's handwritten digits, 32×32 (prompt: 'the digit 7')",
    **{
        name: f"tiny {family} architecture with seeded random weights (noise images; for wiring tests)"
        for name, family in TINY_FAMILY_MODELS.items()
    },
}


def is_builtin(repo: str) -> bool:
    return repo in BUILTIN_MODELS
