"""The shared settings mechanism: one declaration gives the env var, the flag, the help line and the checks."""

from __future__ import annotations

import argparse
from typing import ClassVar

import pytest
from pydantic_settings import SettingsConfigDict

from diffuserve.envsettings import EnvSettings, setting


class ToyError(ValueError):
    pass


class Toy(EnvSettings):
    error_class: ClassVar[type[ValueError]] = ToyError

    playground: bool = setting(False, "PLAYGROUND", help="serve the playground page")
    workers: int = setting(2, "TOY_WORKERS", "LEGACY_WORKERS", help="worker count", ge=1)
    name: str | None = setting(None, "TOY_NAME", help="a name", flag="--called")


class Prefixed(EnvSettings):
    model_config = SettingsConfigDict(env_prefix="TOY_")

    gpu: str = setting("H100", help="GPU type")


def test_one_line_declares_env_flag_help_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    Toy.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--playground, --no-playground serve the playground page [env PLAYGROUND; default off]" in text
    assert "[env TOY_WORKERS, LEGACY_WORKERS; default 2]" in text
    assert "--called" in text
    monkeypatch.setenv("PLAYGROUND", "yes")
    monkeypatch.setenv("LEGACY_WORKERS", "3")
    toy = Toy.from_args(parser.parse_args(["--called", "x"]))
    assert toy.playground is True and toy.workers == 3 and toy.name == "x"
    assert Toy.from_args(parser.parse_args(["--no-playground"])).playground is False


def test_errors_use_the_models_error_class_and_name_env_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAYGROUND", "yes please")
    with pytest.raises(ToyError, match=r"PLAYGROUND \(--playground\): Input should be a valid boolean"):
        Toy.from_env()
    with pytest.raises(
        ToyError, match=r"TOY_WORKERS/LEGACY_WORKERS \(--workers\).*greater than or equal to 1"
    ):
        Toy.from_env({}, workers=0)


def test_a_given_mapping_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOY_WORKERS", "7")
    assert Toy.from_env({"TOY_NAME": "m"}).workers == 2
    assert Toy.from_env({"TOY_NAME": "m"}).name == "m"
    assert Toy.from_env({"TOY_NAME": ""}).name is None  # empty means unset


def test_env_prefix_names_unaliased_fields_and_round_trips() -> None:
    assert Prefixed.env_names() == {"gpu": ("TOY_GPU",)}
    plan = Prefixed.from_env({"TOY_GPU": "B200"})
    assert plan.gpu == "B200" and plan.to_env() == {"TOY_GPU": "B200"}
    toy = Toy.from_env({}, playground=True, name="n")
    assert toy.to_env() == {"PLAYGROUND": "1", "TOY_WORKERS": "2", "TOY_NAME": "n"}
    assert Toy.from_env(toy.to_env()) == toy
