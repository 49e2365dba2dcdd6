"""Settings: env vars (with the names Modal/TheStage set-ups use, and aliases), flags over env, typed values,
strict booleans, and validation messages that name the variable and the flag."""

from __future__ import annotations

import argparse
import pickle

import pytest

from diffuserve.config import DType, LogFormat, Settings, Weights, add_settings_arguments, settings_from_args
from diffuserve.serving.engine_config import served_model_name
from diffuserve.types import Tier


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for names in Settings.env_names().values():
        for name in names:
            monkeypatch.delenv(name, raising=False)


def _parse(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_env_vars_of_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_REPO", "black-forest-labs/FLUX.1-dev")
    monkeypatch.setenv("MODEL_BATCH", "4")
    monkeypatch.setenv("MODEL_SIZE", "s")
    monkeypatch.setenv("PORT", "80")
    monkeypatch.setenv("HUGGINGFACE_ACCESS_TOKEN", "hf_x")
    monkeypatch.setenv("AUTH_TOKEN", "a,b")
    monkeypatch.setenv("CUDA_DEVICES", "0,1")
    monkeypatch.setenv("HF_HOME", "/cache/huggingface")
    settings = Settings.from_env()
    assert settings.port == 80 and settings.model_batch == 4 and settings.model_size is Tier.S
    assert settings.hf_token == "hf_x" and settings.devices == "0,1"
    assert settings.api_keys == ["a", "b"]
    assert settings.resolved_cache_dir == "/cache/huggingface/diffuserve"
    assert served_model_name(settings) == "flux-1-dev-s-bs4"


def test_first_alias_wins_and_empty_values_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "k1")
    monkeypatch.setenv("AUTH_TOKEN", "k2")
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HUGGINGFACE_ACCESS_TOKEN", "hf_y")
    settings = Settings.from_env()
    assert settings.api_keys == ["k1"] and settings.hf_token == "hf_y"


def test_choices_are_enums_and_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_DTYPE", "BFloat16")
    monkeypatch.setenv("LOG_FORMAT", "JSON")
    monkeypatch.setenv("MODEL_WEIGHTS", "random")
    settings = Settings.from_env()
    assert settings.dtype is DType.BFLOAT16 and settings.log_format is LogFormat.JSON
    assert settings.weights is Weights.RANDOM
    # The values still compare and print as the plain strings the engine and logs use.
    assert settings.dtype == "bfloat16" and f"{settings.model_size}" == "XL"


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("WARMUP", "1")
    monkeypatch.setenv("MODEL_BATCH", "2")
    settings = _parse(
        ["--port", "9100", "--api-key", "k1", "--api-key", "k2,k3", "--tier", "l", "--no-warmup"]
    )
    assert settings.port == 9100
    assert settings.api_keys == ["k1", "k2", "k3"]
    assert settings.model_size is Tier.L
    assert settings.warmup is False
    assert settings.model_batch == 2  # no flag: the env var shows through


@pytest.mark.parametrize("raw", ["1", "true", "yes", "on", "0", "false", "no", "off", "TRUE"])
def test_booleans_read_the_usual_spellings(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("WARMUP", raw)
    assert Settings.from_env().warmup is (raw.lower() in {"1", "true", "yes", "on"})


@pytest.mark.parametrize("raw", ["ture", "enabled", "2", "y es"])
def test_a_mistyped_boolean_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("WARMUP", raw)
    with pytest.raises(ValueError, match=r"WARMUP \(--warmup\): Input should be a valid boolean"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_batch": 0}, "MODEL_BATCH"),
        ({"model_size": "XXL"}, r"MODEL_SIZE \(--model-size\): Input should be 'E', 'XL', 'L', 'M' or 'S'"),
        ({"port": 70000}, "PORT"),
        ({"weights": "zeros"}, "MODEL_WEIGHTS"),
        ({"dtype": "int8"}, "MODEL_DTYPE"),
        ({"log_format": "xml"}, "LOG_FORMAT"),
        ({"log_level": "loud"}, "LOG_LEVEL"),
        ({"max_body_bytes": 0}, "MAX_BODY_BYTES"),
        ({"max_images_per_request": 0}, "MAX_IMAGES_PER_REQUEST"),
        ({"cpu_threads": -1}, "CPU_THREADS"),
        ({"request_timeout": 0}, "REQUEST_TIMEOUT"),
        ({"models": [""]}, "MODELS"),
        ({"models": ["a=digits", "a=tiny-random"]}, "MODELS"),
        ({"models": ["digits", "tiny-random"], "model_name": "x"}, "MODEL_NAME"),
        ({"model_devices": ["digits"]}, "MODEL_DEVICES"),
    ],
)
def test_invalid_settings_name_the_setting(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**overrides)


def test_unparsable_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "abc")
    with pytest.raises(ValueError, match=r"PORT \(--port\): Input should be a valid integer.*got 'abc'"):
        Settings.from_env()


def test_help_lists_every_setting_with_env_and_default() -> None:
    parser = argparse.ArgumentParser(prog="diffuserve serve")
    add_settings_arguments(parser)
    text = " ".join(parser.format_help().split())
    for name, envs in Settings.env_names().items():
        assert Settings.flag_names(name)[0] in text
        for env in envs:
            assert env in text, env
    assert "[env MODEL_BATCH; default 4]" in text
    assert "[env DEVICES, CUDA_DEVICES; default auto]" in text
    assert "--warmup, --no-warmup" in text


def test_settings_cross_to_worker_processes() -> None:
    settings = Settings.from_env(model_batch=3, api_keys=["k"])
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_secrets_stay_out_of_the_repr() -> None:
    text = repr(Settings.from_env(api_keys=["sk-secret"], hf_token="hf_secret"))
    assert "sk-secret" not in text and "hf_secret" not in text
