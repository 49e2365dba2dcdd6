"""`diffuserve models`: the built-in models and the families whose defaults the engine knows."""

from __future__ import annotations

import argparse
from typing import Any

from diffuserve.config import DEFAULT_MODEL


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("models", help="list built-in models and known model families")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffuserve.models.registry import BUILTIN_DESCRIPTIONS
    from diffuserve.types import FAMILIES

    print("Built-in models (no download):")
    for name, description in BUILTIN_DESCRIPTIONS.items():
        marker = " (default)" if name == DEFAULT_MODEL else ""
        print(f"  {name:<22}{marker:<10} {description}")
    print("\nAny diffusers text-to-image repo id or local folder also works (MODELS). Family defaults:")
    print(f"  {'family':<16} {'steps':>5} {'guidance':>8} {'native':>7} {'negative prompt':>16}")
    for family in FAMILIES.values():
        print(
            f"  {family.name:<16} {family.default_steps:>5} {family.default_guidance:>8} "
            f"{family.native_size:>7} {'yes' if family.supports_negative_prompt else 'no':>16}"
        )
    return 0
