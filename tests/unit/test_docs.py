"""The README's configuration table stays true to the settings object."""

from __future__ import annotations

from dataclasses import fields

from diffuserve.config import Settings
from tests.helpers import ROOT


def test_every_setting_is_documented_in_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for f in fields(Settings):
        for env in f.metadata["env"]:
            assert f"`{env}`" in readme, f"{env} ({f.name}) is missing from README.md"


def test_readme_quick_start_has_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
