"""Where adapters come from: names given at start (`--lora NAME=PATH`) and files under LORA_DIR, each read
once (its header) and remembered until the file changes."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from diffuserve.loras.files import AdapterError, AdapterLayout, read_layout

SUFFIX = ".safetensors"
# diffusers' default file name for an adapter saved into a folder.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# A name under LORA_DIR: path parts of letters, digits, '_', '-' and '.', never '..' or a leading '/'.
_NAME = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)*")
MAX_NAME_CHARS = 200
# `--lora NAME=org/repo` or `NAME=org/repo:file.safetensors`, where no such file is here: a hub adapter. A
# value ending in .safetensors without the colon is a file path, never a repo: a missing file stays an error.
_HUB_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<file>[\w./-]+\.safetensors))?")


def hub_ref(path: str) -> tuple[str, str | None] | None:
    """(repo, file or None) where `path` names a hub repo rather than a file or folder on this machine."""
    if Path(path).expanduser().exists() or (path.endswith(SUFFIX) and ":" not in path):
        return None
    match = _HUB_REF.fullmatch(path)
    return (match["repo"], match["file"]) if match else None


class AdapterNotFound(AdapterError):
    """No adapter of that name here."""


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    layout: AdapterLayout


class LoraCatalog:
    """Thread-safe: requests resolve their adapters off the event loop."""

    def __init__(self, directory: str | None, preloaded: dict[str, str]) -> None:
        self.directory = Path(directory).expanduser().resolve() if directory else None
        # Hub adapters join `preloaded` once pulled (`provide`); until then a request naming one is told so.
        self.hub = {name: ref for name, path in preloaded.items() if (ref := hub_ref(path)) is not None}
        self.preloaded = {
            name: Path(path).expanduser().resolve()
            for name, path in preloaded.items()
            if name not in self.hub
        }
        self._layouts: dict[Path, tuple[tuple[int, int], AdapterLayout]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.directory is not None or bool(self.preloaded) or bool(self.hub)

    def resolve(self, name: str, weight_name: str | None = None) -> ResolvedAdapter:
        """The adapter a request names; AdapterError (a 400 for `loras`) when it is unknown or unusable."""
        path = self.path_of(name, weight_name)
        return ResolvedAdapter(name if weight_name is None else f"{name}:{weight_name}", self.layout(path))

    def provide(self, name: str, path: Path) -> None:
        """A hub adapter named at start, now in the hub cache at `path`."""
        self.preloaded[name] = path

    def path_of(self, name: str, weight_name: str | None = None) -> Path:
        if weight_name is None and name in self.preloaded:
            return self.preloaded[name]
        if weight_name is None and name in self.hub:
            raise AdapterNotFound(f"adapter {name!r} is still being downloaded from {self.hub[name][0]}")
        if self.directory is None:
            known = ", ".join(sorted(self.preloaded)) or "none"
            raise AdapterNotFound(
                f"no adapter named {name!r} (loaded at start: {known}; LORA_DIR is not set)"
            )
        for part in (name, weight_name or ""):
            if len(part) > MAX_NAME_CHARS or (part and not _NAME.fullmatch(part)):
                raise AdapterError(
                    f"{part[:MAX_NAME_CHARS]!r} is not an adapter name: letters, digits, '_', '-', '.' and '/' "
                    "between them, a path inside LORA_DIR"
                )
        base = self.directory / name
        candidates = (
            [base / weight_name]
            if weight_name
            else [base.with_name(base.name + SUFFIX), base / DEFAULT_WEIGHT_NAME, *_single_file(base)]
        )
        for candidate in candidates:
            resolved = candidate.resolve()
            if not resolved.is_relative_to(self.directory):
                raise AdapterError(f"adapter {name!r} lies outside LORA_DIR (a link out of it)")
            if resolved.is_file():
                return resolved
        if weight_name:
            raise AdapterNotFound(f"no file {weight_name!r} in adapter folder {name!r} of LORA_DIR")
        raise AdapterNotFound(f"no adapter named {name!r} in LORA_DIR (see GET /v1/loras)")

    def layout(self, path: Path) -> AdapterLayout:
        """The file's layout, read again only when its size or modification time changed."""
        try:
            stat = path.stat()
        except OSError as exc:
            raise AdapterNotFound(f"adapter file {path.name!r} cannot be read ({exc.strerror})") from None
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._layouts.get(path)
            if known is not None and known[0] == stamp:
                return known[1]
        layout = read_layout(path, check_values=True)
        with self._lock:
            self._layouts[path] = (stamp, layout)
        return layout

    def names(self) -> list[str]:
        """The adapters a request can name: those loaded at start, then LORA_DIR's files (without suffix)."""
        found = list(dict.fromkeys([*self.preloaded, *self.hub]))
        if self.directory is not None and self.directory.is_dir():
            for root, dirs, files in os.walk(self.directory):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                folder = Path(root).relative_to(self.directory)
                for file in sorted(files):
                    if file.endswith(SUFFIX) and not file.startswith("."):
                        name = (folder / file).as_posix()
                        short = (
                            folder.as_posix()
                            if file == DEFAULT_WEIGHT_NAME and folder.parts
                            else name.removesuffix(SUFFIX)
                        )
                        if short not in found:
                            found.append(short)
        return found


def _single_file(folder: Path) -> list[Path]:
    """A folder holding exactly one adapter file names it."""
    if not folder.is_dir():
        return []
    files = [child for child in folder.iterdir() if child.suffix == SUFFIX]
    return files if len(files) == 1 else []
