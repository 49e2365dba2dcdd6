"""docs/configuration.md stays true to the settings object: one table row per setting, with every env var,
every flag and the default that `diffuserve serve --help` shows, and no row for a setting that is gone."""

from __future__ import annotations

import argparse
import re

from diffuserve.config import Settings, add_settings_arguments
from tests.helpers import ROOT

PAGE = ROOT / "docs" / "configuration.md"
HELP_DEFAULT = re.compile(r"; default (.*)\]$", re.DOTALL)


def table_rows() -> list[list[str]]:
    """The cells of the settings table's rows (those whose first cell names an env var in backticks)."""
    rows = []
    for line in PAGE.read_text().splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def names_in(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def cli_flags() -> dict[str, tuple[set[str], str]]:
    """Setting name → every flag argparse accepts for it (`--no-…` included) and the default its help shows."""
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = {}
    for action in parser._actions:
        if action.dest in Settings.model_fields:
            match = HELP_DEFAULT.search(action.help or "")
            assert match, f"no default in the help of {action.dest}"
            flags[action.dest] = (set(action.option_strings), match.group(1))
    return flags


def test_every_setting_has_one_row_with_its_env_vars_flags_and_default() -> None:
    rows = table_rows()
    flags = cli_flags()
    for name, envs in Settings.env_names().items():
        matching = [row for row in rows if set(envs) <= names_in(row[0])]
        assert len(matching) == 1, f"{'/'.join(envs)} ({name}) needs exactly one row in {PAGE.name}"
        env_cell, flag_cell, default_cell = matching[0][:3]
        assert names_in(env_cell) == set(envs), (
            f"the env cell of {name} names {names_in(env_cell)}, not {envs}"
        )
        assert set(Settings.flag_names(name)) <= names_in(flag_cell), f"a flag of {name} is missing"
        option_strings, default = flags[name]
        assert names_in(flag_cell) == option_strings, f"the flags of {name} are {sorted(option_strings)}"
        shown = default_cell.replace("`", "")
        assert shown == (default or "empty"), f"the default of {name} is {default!r}, the page says {shown!r}"


def test_every_row_is_a_setting() -> None:
    known = {env for envs in Settings.env_names().values() for env in envs}
    for row in table_rows():
        assert names_in(row[0]) <= known, f"{row[0]} is not a setting of diffuserve serve"


def test_every_choice_is_documented() -> None:
    """A choice setting's row names each of its values, so a new value cannot go unmentioned."""
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    rows = {frozenset(names_in(row[0])): row for row in table_rows()}
    for action in parser._actions:
        if action.dest not in Settings.model_fields or not action.metavar or "{" not in str(action.metavar):
            continue
        choices = str(action.metavar).strip("{}").split(",")
        row = rows[frozenset(Settings.env_of(action.dest))]
        for choice in choices:
            assert f"`{choice}`" in " ".join(row[2:]), f"{action.dest}: `{choice}` is not documented"
