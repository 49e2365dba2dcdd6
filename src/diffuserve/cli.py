"""Command-line entry point: `diffuserve serve | generate | models | …`; each command lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from diffuserve import __version__
from diffuserve.extras import MissingExtra, require_extra

# Each module defines `register(subparsers)`, which adds its sub-command and sets `func` on its parser, and
# `needs_extra` when the command needs an optional dependency group (see diffuserve.extras).
COMMAND_MODULES = [
    "diffuserve.commands.serve",
    "diffuserve.commands.pull",
    "diffuserve.commands.generate",
    "diffuserve.commands.models",
    "diffuserve.deploy.cli",
    "diffuserve.bench.command",
    "diffuserve.commands.digits",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffuserve", description="OpenAI-compatible server for text-to-image diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"diffuserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        extra = getattr(args, "needs_extra", None)
        if extra:
            require_extra(extra, args.command)
        result = args.func(args)
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`diffuserve deploy modal --dry-run | head`): nothing more to say, and Python's own
        # flush of stdout at exit must not raise again (the recipe of Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
