"""Several models in one server: their names from the command line, flags and env, where each one runs, and
a set that does not fit its devices refused at start with the numbers."""

from __future__ import annotations

import pytest

from diffuserve.cli import build_parser
from diffuserve.commands.serve import settings_for
from diffuserve.config import Settings
from diffuserve.model_specs import ModelSpec
from diffuserve.serving.placement import GIB, estimate_weight_bytes, place_models


def test_serve_takes_models_as_arguments_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "digits", "noise=tiny-random", "--model", "./folder"])
    specs = settings_for(args).model_specs
    assert [(s.name, s.repo) for s in specs] == [
        (None, "digits"),
        ("noise", "tiny-random"),
        (None, "./folder"),
    ]
    monkeypatch.setenv("MODELS", "digits,tiny-random")
    monkeypatch.setenv("MODEL_DEVICES", "digits=cpu;tiny-random=cpu,cpu")
    settings = settings_for(parser.parse_args(["serve"]))
    assert [s.repo for s in settings.model_specs] == ["digits", "tiny-random"]
    assert settings.model_devices == ["digits=cpu", "tiny-random=cpu,cpu"]
    assert settings.to_env()["MODEL_DEVICES"] == "digits=cpu;tiny-random=cpu,cpu"


def test_models_share_devices_unless_given_their_own() -> None:
    settings = Settings.from_env(
        {}, models=["a=digits", "b=tiny-random"], devices="cpu,cpu", model_devices=["b=cpu"]
    )
    placement = place_models(settings, weight_bytes=lambda spec, device: None)
    assert {spec.name: devices for spec, devices in placement.items()} == {"a": ["cpu", "cpu"], "b": ["cpu"]}


def test_model_devices_must_name_a_served_model() -> None:
    settings = Settings.from_env({}, models=["digits"], model_devices=["sdxl=0"])
    with pytest.raises(
        ValueError, match=r"names 'sdxl', which is not one served model \(served: digits-xl-bs4\)"
    ):
        place_models(settings)


def test_a_set_that_does_not_fit_is_refused_with_the_numbers() -> None:
    settings = Settings.from_env({}, models=["flux=digits", "sdxl=tiny-random"], devices="0")
    sizes = {"flux": 24 * GIB, "sdxl": 7 * GIB}

    def weights(spec: ModelSpec, device: str) -> int:
        return sizes[spec.name or ""]

    with pytest.raises(ValueError) as refused:
        place_models(settings, weight_bytes=weights, capacity=lambda device: 32 * GIB, gpus_present=True)
    assert str(refused.value) == (
        "the models do not fit cuda:0: flux ≈ 24.0 GiB + sdxl ≈ 7.0 GiB = 31.0 GiB of weights, over 90% of its "
        "32.0 GiB; give each model its own devices with MODEL_DEVICES"
    )
    fits = place_models(settings, weight_bytes=weights, capacity=lambda device: 80 * GIB, gpus_present=True)
    assert list(fits.values()) == [["cuda:0"], ["cuda:0"]]


def test_weights_are_sized_from_safetensors_headers_at_the_served_dtype() -> None:
    cpu = estimate_weight_bytes(ModelSpec("digits"), Settings.from_env({}), "cpu")
    gpu = estimate_weight_bytes(ModelSpec("digits"), Settings.from_env({}), "cuda:0")
    assert cpu and gpu and cpu == 2 * gpu  # fp32 on the CPU, bf16 on a GPU
    assert estimate_weight_bytes(ModelSpec("tiny-random"), Settings.from_env({}), "cpu") is None


def test_a_gpu_asked_of_a_machine_without_one_is_refused_in_one_line() -> None:
    settings = Settings.from_env({}, models=["digits"], devices="cuda:0")
    with pytest.raises(
        ValueError, match=r"^cuda:0 asked for, but this machine has no NVIDIA GPU; use DEVICES=cpu$"
    ):
        place_models(settings, gpus_present=False)


def test_random_weights_are_sized_from_the_released_configs() -> None:
    settings = Settings.from_env(
        {}, models=["Qwen/Qwen-Image", "black-forest-labs/FLUX.1-dev"], weights="random", devices="0"
    )
    qwen = estimate_weight_bytes(ModelSpec("Qwen/Qwen-Image"), settings, "cuda:0")
    assert qwen is not None and 53 * GIB < qwen < 54 * GIB  # 28.85 B parameters in bf16
    with pytest.raises(
        ValueError, match=r"^the models do not fit cuda:0: qwen-image-xl-bs4 ≈ 53\.\d GiB \+ flux"
    ):
        place_models(settings, capacity=lambda device: 80 * GIB, gpus_present=True)
