"""`diffuserve pull MODEL…`: download models into the hub cache ahead of serving, with progress, resumable."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from diffuserve.hub import PullProgress

# Seconds between plain progress lines when stderr is not a terminal (a log file, CI, `docker build`).
LOG_INTERVAL_S = 5.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="download models into the hub cache ahead of serving (resumable)",
        description="Download diffusers pipelines from the Hugging Face hub into its cache (HF_HOME): only the "
        "files a pipeline needs, resuming partial files. Prints each model's local folder on stdout; progress "
        "goes to stderr.",
    )
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="hub repo id (org/name); built-in ids and local folders need nothing",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument(
        "--token", default=None, help="hub token for gated or private repos (default: HF_TOKEN)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffuserve.hub import PullError

    # The settings' second name for the token (diffuserve.config); HF_TOKEN itself the hub library reads.
    token = args.token or os.environ.get("HUGGINGFACE_ACCESS_TOKEN") or None
    failed = 0
    for model in args.models:
        display = ProgressDisplay(model, sys.stderr)
        try:
            print(_pull_one(model, args.revision, token, display))
        except PullError as exc:
            display.close()
            print(f"diffuserve pull: {exc}", file=sys.stderr)
            failed += 1
        except KeyboardInterrupt:
            display.close()
            print(f"diffuserve pull: {model} interrupted; run the same command to resume", file=sys.stderr)
            return 130
    return 1 if failed else 0


def _pull_one(model: str, revision: str | None, token: str | None, display: ProgressDisplay) -> str:
    from diffuserve.engine.loader import looks_like_local_path
    from diffuserve.hub import PullError, missing_files, pull
    from diffuserve.models.registry import is_builtin  # the registry alone: diffusers stays unimported

    if is_builtin(model):
        return f"{model}: built in, nothing to pull"
    if looks_like_local_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise PullError(f"model path {model!r} does not exist")
        missing = missing_files(folder)
        if missing == ["model_index.json"]:
            raise PullError(f"{model!r} is not a diffusers pipeline folder (no model_index.json)")
        if missing:
            raise PullError(f"{model!r} is not a complete pipeline folder; missing: {', '.join(missing)}")
        return f"{folder.resolve()}: local pipeline folder, nothing to pull"
    return str(pull(model, revision=revision, token=token, progress=display))


class ProgressDisplay:
    """A pull's progress on `stream`: one updating line on a terminal, else a plain line every few seconds."""

    def __init__(self, name: str, stream: TextIO, *, interval_s: float = LOG_INTERVAL_S) -> None:
        from diffuserve.hub.progress import progress_line, throttled

        self.name = name
        self.stream = stream
        self.tty = stream.isatty()
        self.width = 0  # length of the bar line on screen, to blank what a shorter update leaves
        self.open = False
        self._lines = throttled(lambda p: self._write(progress_line(p, name) + "\n"), interval_s)

    def __call__(self, progress: PullProgress) -> None:
        if not self.tty:
            self._lines(progress)
            return
        from diffuserve.hub.progress import format_progress

        columns = shutil.get_terminal_size().columns
        line = format_progress(progress, self.name)[: max(20, columns - 1)]
        self._write("\r" + line + " " * max(0, self.width - len(line)))
        self.width, self.open = len(line), True
        if progress.finished:
            self.close()

    def close(self) -> None:
        """End an open bar line, so what follows starts on its own line."""
        if self.open:
            self._write("\n")
            self.open = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
