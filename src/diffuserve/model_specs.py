"""Which models one server serves: `[NAME=]REPO` entries, their served names and aliases, and their devices."""

from __future__ import annotations

import re
from dataclasses import dataclass

# A name given as `NAME=REPO`: what clients may send as `model`. Hub ids and paths are never mistaken for one:
# a hub id has a slash, a path starts with one of / . ~
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def model_slug(repo: str) -> str:
    """`black-forest-labs/FLUX.1-dev` → `flux-1-dev`; a local folder → its name."""
    base = repo.rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-") or "model"


@dataclass(frozen=True)
class ModelSpec:
    """One served model: where it comes from, and the name it was given (None: derived from the repo)."""

    repo: str
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        text = text.strip()
        name, sep, repo = text.partition("=")
        if sep and _NAME.fullmatch(name.strip()) and repo.strip():
            return cls(repo=repo.strip(), name=name.strip())
        if sep and not repo.strip():
            raise ValueError(f"{text!r} names no model after '='")
        return cls(repo=text)

    def aliases(self, served_name: str) -> set[str]:
        """Every name a request may use for this model: its served name, its repo and the repo's slug."""
        return {served_name, self.repo, model_slug(self.repo)} | ({self.name} if self.name else set())


def parse_models(entries: list[str]) -> list[ModelSpec]:
    """The served models, in order; the same repo twice needs two names (so a request can tell them apart)."""
    specs = [ModelSpec.parse(entry) for entry in entries if entry.strip()]
    if not specs:
        raise ValueError("names no model")
    seen: set[str] = set()
    for spec in specs:
        key = spec.name or spec.repo
        if key in seen:
            raise ValueError(f"{key!r} is served twice; give each copy its own name as NAME={spec.repo}")
        seen.add(key)
    return specs


def parse_model_devices(entries: list[str]) -> dict[str, str]:
    """`NAME=DEVICES` entries (`flux=0,1`, `sdxl=cuda:2`) → {model: devices}; the model is any of its aliases."""
    return _named_values(entries, "MODEL=DEVICES (e.g. flux=0,1)")


def parse_named_paths(items: list[str], setting: str) -> dict[str, str]:
    """`NAME=PATH` items (adapters read at start) → name → path; a malformed one names its setting."""
    try:
        return _named_values(items, "NAME=PATH")
    except ValueError as exc:
        raise ValueError(f"{setting}: {exc}") from None


def _named_values(items: list[str], form: str) -> dict[str, str]:
    """`NAME=VALUE` items → {name: value}, both stripped; one without either side is a ValueError."""
    found: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{item!r} is not {form}")
        found[name.strip()] = value.strip()
    return found
