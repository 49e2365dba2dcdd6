"""Served model names (`flux-1-dev-s-bs4`), kept free of heavy imports so the API process starts fast."""

from __future__ import annotations

import re

from diffuserve.config import Settings


def model_slug(repo: str) -> str:
    """`black-forest-labs/FLUX.1-dev` → `flux-1-dev`; a local folder → its name."""
    base = repo.rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-") or "model"


def served_model_name(settings: Settings) -> str:
    """The name clients use: explicit, or `<slug>-<tier>-bs<batch>` like `flux-1-dev-s-bs4`."""
    if settings.model_name:
        return settings.model_name
    return f"{model_slug(settings.model_repo)}-{settings.model_size.lower()}-bs{settings.model_batch}"
