"""Optional dependency groups (pyproject extras): a command that needs one names it in one line, then exits."""

from __future__ import annotations

import importlib.util

# Extra → the top-level modules a command of that extra imports (pyproject.toml lists the distributions).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "bench": ("locust", "httpx", "matplotlib", "tqdm"),
    "digits": ("sklearn", "openai"),
    "deploy": ("modal",),
}


class MissingExtra(RuntimeError):
    """A command's optional dependencies are not installed; the message says which extra to install."""


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, command: str) -> None:
    """Raise MissingExtra when any module of `extra` is absent; imports nothing (locust patches sockets on import)."""
    if missing_modules(extra):
        raise MissingExtra(f"diffuserve {command} needs the {extra} extra: pip install 'diffuserve[{extra}]'")
