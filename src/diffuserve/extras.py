"""Optional dependency groups (pyproject extras): a command that needs one names it in one line, then exits."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

# Extra → the top-level modules a command of that extra imports (pyproject.toml lists the distributions).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "bench": ("locust", "httpx", "matplotlib", "tqdm"),
    "digits": ("sklearn", "openai", "peft"),
    "deploy": ("modal",),
    "jobs-postgres": ("psycopg",),
}


class MissingExtra(RuntimeError):
    """A command's optional dependencies are not installed; the message says which extra to install."""


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def install_command(extra: str) -> str:
    """The command that installs `extra` into this very environment: from the checkout it runs from (an
    editable install; diffuserve is not on PyPI yet), else from the index."""
    root = Path(__file__).resolve().parents[2]
    source = f"{root}[{extra}]" if (root / "pyproject.toml").is_file() else f"diffuserve[{extra}]"
    editable = "-e " if source.startswith(str(root)) else ""
    return f"{shlex.quote(sys.executable)} -m pip install {editable}{shlex.quote(source)}"


def require_extra(extra: str, command: str) -> None:
    """Raise MissingExtra when any module of `extra` is absent; imports nothing (locust patches sockets on import)."""
    if missing_modules(extra):
        raise MissingExtra(f"diffuserve {command} needs the {extra} extra: {install_command(extra)}")
