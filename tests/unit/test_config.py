"""Settings: env vars (with the names Modal/TheStage set-ups use, and aliases), flags over env, validation messages."""

from __future__ import annotations

import argparse

import pytest

from diffuserve.config import Settings, add_settings_arguments, settings_from_args
from diffuserve.engine.naming import served_model_name


def test_env_vars_of_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_REPO", "black-forest-labs/FLUX.1-dev")
    monkeypatch.setenv("MODEL_BATCH", "4")
    monkeypatch.setenv("MODEL_SIZE", "s")
    monkeypatch.setenv("PORT", "80")
    monkeypatch.setenv("HUGGINGFACE_ACCESS_TOKEN", "hf_x")
    monkeypatch.setenv("AUTH_TOKEN", "a,b")
    settings = Settings.from_env()
    assert settings.port == 80 and settings.model_batch == 4 and settings.model_size == "S"
    assert settings.hf_token == "hf_x"
    assert settings.api_keys == ["a", "b"]
    assert served_model_name(settings) == "flux-1-dev-s-bs4"


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    args = parser.parse_args(
        ["--port", "9100", "--api-key", "k1", "--api-key", "k2,k3", "--tier", "L", "--no-warmup"]
    )
    settings = settings_from_args(args)
    assert settings.port == 9100
    assert settings.api_keys == ["k1", "k2", "k3"]
    assert settings.model_size == "L"
    assert settings.warmup is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_batch": 0}, "MODEL_BATCH"),
        ({"model_size": "XXL"}, "MODEL_SIZE"),
        ({"port": 70000}, "PORT"),
        ({"weights": "zeros"}, "--weights"),
        ({"log_format": "xml"}, "LOG_FORMAT"),
        ({"log_level": "loud"}, "LOG_LEVEL"),
        ({"max_body_bytes": 0}, "MAX_BODY_BYTES"),
        ({"max_images_per_request": 0}, "MAX_IMAGES_PER_REQUEST"),
        ({"cpu_threads": -1}, "CPU_THREADS"),
    ],
)
def test_invalid_settings_name_the_setting(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**overrides)


def test_cache_dir_follows_hf_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", "/cache/huggingface")
    assert Settings().resolved_cache_dir == "/cache/huggingface/diffuserve"


def test_unparsable_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "abc")
    with pytest.raises(ValueError, match="PORT must be int, got 'abc'"):
        Settings.from_env()
