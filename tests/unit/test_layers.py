"""The import contract in pyproject.toml (run by `make lint`): kept by the package, broken by an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is a dev extra")


def lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_package(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "src" / "diffuserve", src / "diffuserve", ignore=shutil.ignore_patterns("pipeline")
    )
    return src


def test_the_package_keeps_the_layers(tmp_path: Path) -> None:
    result = lint_imports(copy_package(tmp_path), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("models/registry.py", "diffuserve.engine.loader"),  # models -> engine
        ("engine/encode.py", "diffuserve.serving.scheduler"),  # engine -> serving
        ("types.py", "diffuserve.protocol"),  # the bottom module -> anything
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, module: str, upward: str) -> None:
    src = copy_package(tmp_path)
    path = src / "diffuserve" / module
    path.write_text(path.read_text() + f"\nimport {upward}  # planted\n")
    result = lint_imports(src, tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and upward in result.stdout
