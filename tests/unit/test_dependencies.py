"""The server installs lean: load-testing, plotting and training packages live in extras, the serve path never
imports them, and a command whose extra is missing says in one line which one to install."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from diffuserve.extras import EXTRA_MODULES
from tests.helpers import ROOT

# Distributions only some commands use: none may be a base dependency of the server.
NOT_FOR_THE_SERVER = {
    "locust",
    "matplotlib",
    "scikit-learn",
    "tqdm",
    "httpx",
    "openai",
    "modal",
    "supervisor",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def _hide_and_run(hidden: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where `hidden` modules cannot be imported (as if not installed)."""
    hide = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in hidden)
    return subprocess.run(
        [sys.executable, "-c", hide + code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def _installed_requirements() -> dict[str | None, list[Requirement]]:
    """What installing diffuserve pulls, by extra (None: the base), from the installed package's metadata: what
    pip resolves, not the text of pyproject.toml."""
    by_extra: dict[str | None, list[Requirement]] = {}
    for text in importlib.metadata.requires("diffuserve") or []:
        requirement = Requirement(text)
        extra = re.search(r'extra == "([^"]+)"', str(requirement.marker or ""))
        by_extra.setdefault(extra[1] if extra else None, []).append(requirement)
    return by_extra


def test_base_dependencies_leave_out_the_extras() -> None:
    installed = _installed_requirements()
    names = {extra: {_name(req.name) for req in reqs} for extra, reqs in installed.items()}
    base = names[None]
    assert not base & NOT_FOR_THE_SERVER, f"base dependencies pull {sorted(base & NOT_FOR_THE_SERVER)}"
    assert names["bench"] >= {"locust", "matplotlib", "httpx", "tqdm"}
    assert "scikit-learn" in names["digits"]
    assert "modal" in names["deploy"]
    # `make test` installs `.[dev]`: it must bring every extra the tests exercise.
    assert any(
        req.name == "diffuserve" and req.extras >= {"bench", "digits", "deploy"} for req in installed["dev"]
    )


def test_bench_without_its_extra_names_it_in_one_line() -> None:
    result = _hide_and_run(
        EXTRA_MODULES["bench"],
        "from diffuserve.cli import main\nsys.exit(main(['bench', '--spawn-server', '--users', '1']))\n",
    )
    assert result.returncode != 0
    assert result.stdout == ""
    # From this checkout: the editable install into this very interpreter, a command that works as printed.
    assert result.stderr.splitlines() == [
        f"diffuserve bench needs the bench extra: {sys.executable} -m pip install -e '{ROOT}[bench]'"
    ]


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["train-digits"], "digits"),
        (["eval", "digits"], "digits"),
        (["digits-grid", "--base-url", "http://x"], "digits"),
        (["train-digits-lora"], "digits"),
    ],
)
def test_other_commands_name_their_extra(argv: list[str], extra: str) -> None:
    result = _hide_and_run(
        EXTRA_MODULES[extra], f"from diffuserve.cli import main\nsys.exit(main({argv!r}))\n"
    )
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1
    assert f"needs the {extra} extra: {sys.executable} -m pip install -e '{ROOT}[{extra}]'" in result.stderr


def test_serve_path_imports_no_extra() -> None:
    hidden = tuple(
        name for modules in EXTRA_MODULES.values() for name in modules if name not in {"tqdm", "httpx"}
    )
    # tqdm and httpx may arrive with diffusers and the hub client; the server itself never imports them.
    result = _hide_and_run(
        hidden,
        "import diffuserve.cli, diffuserve.commands.serve, diffuserve.api.app\n"
        "import diffuserve.serving.worker_process, diffuserve.engine.engine, diffuserve.engine.loader\n"
        "from diffuserve.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--help'])\n",
    )
    assert result.returncode == 0, result.stderr
    assert "--model-repo" in result.stdout
