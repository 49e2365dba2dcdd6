"""The README's configuration table stays true to the settings object."""

from __future__ import annotations

from diffuserve.config import Settings
from tests.helpers import ROOT


def test_every_setting_is_documented_in_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, envs in Settings.env_names().items():
        for env in envs:
            assert f"`{env}`" in readme, f"{env} ({name}) is missing from README.md"
        assert f"`{Settings.flag_names(name)[0]}" in readme, f"the flag of {name} is missing from README.md"


def test_readme_quick_start_has_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
