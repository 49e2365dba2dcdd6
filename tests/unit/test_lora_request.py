"""A request's `loras`: the field's validation, and each adapter resolved against the model or refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from diffuserve.config import Settings
from diffuserve.errors import InvalidRequest
from diffuserve.protocol.edits import ImageEditRequest
from diffuserve.protocol.generation import ImageGenerationRequest
from diffuserve.serving.adapters import AdapterResolver
from diffuserve.types import LoraUse, ModelInfo

Q, K = "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"
TARGETS = {Q: (8, 16), K: (8, 16)}


def parse(loras: Any) -> ImageGenerationRequest:
    return ImageGenerationRequest.parse({"prompt": "p", "loras": loras})


def refused(loras: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(loras)
    return caught.value


def test_loras_are_read_with_their_defaults_in_order() -> None:
    request = parse(
        [{"name": "ink", "scale": 0.5}, {"name": "brush", "weight_name": "b.safetensors"}, {"name": "x"}]
    )
    assert request.adapters == [("ink", None, 0.5), ("brush", "b.safetensors", 1.0), ("x", None, 1.0)]
    assert ImageGenerationRequest.parse({"prompt": "p"}).adapters == []


@pytest.mark.parametrize("scale", [-4, -1.5, 0, 4.0])
def test_scales_within_four_either_way_are_taken(scale: float) -> None:
    assert parse([{"name": "ink", "scale": scale}]).adapters[0][2] == scale


@pytest.mark.parametrize("scale", [4.01, -4.5, 100, float("nan"), float("inf")])
def test_a_scale_out_of_range_names_its_field(scale: float) -> None:
    error = refused([{"name": "ink"}, {"name": "brush", "scale": scale}])
    assert error.param == "loras.1.scale"
    assert "loras.1.scale" in str(error)


@pytest.mark.parametrize(
    ("lora", "param"),
    [
        ({"name": "ink", "scale": "1"}, "loras.0.scale"),
        ({"name": ""}, "loras.0.name"),
        ({"name": 3}, "loras.0.name"),
        ({"scale": 1.0}, "loras.0.name"),
        ({"name": "ink", "weight_name": ""}, "loras.0.weight_name"),
        ({"name": "ink", "strength": 1.0}, "loras.0.strength"),
        ("ink", "loras.0"),
    ],
)
def test_a_malformed_lora_names_its_field(lora: Any, param: str) -> None:
    assert refused([lora]).param == param


def test_at_most_four_adapters() -> None:
    assert len(parse([{"name": f"a{i}"} for i in range(4)]).adapters) == 4
    error = refused([{"name": f"a{i}"} for i in range(5)])
    assert error.param == "loras"
    assert "at most 4" in str(error)


def test_an_adapter_named_twice_is_refused() -> None:
    error = refused([{"name": "ink", "scale": 0.5}, {"name": "ink", "scale": 1.0}])
    assert error.param == "loras"
    assert "named twice" in str(error)
    error = refused([{"name": "ink", "weight_name": "a"}, {"name": "ink", "weight_name": "a"}])
    assert "named twice" in str(error)
    assert (
        len(parse([{"name": "ink", "weight_name": "a"}, {"name": "ink", "weight_name": "b"}]).adapters) == 2
    )


def test_a_multipart_form_sends_loras_as_json_text() -> None:
    text = json.dumps([{"name": "ink", "scale": -0.5}, {"name": "brush", "weight_name": "b.safetensors"}])
    request = ImageEditRequest.parse_form({"prompt": "p", "loras": text, "strength": "0.5"})
    assert request.adapters == [("ink", None, -0.5), ("brush", "b.safetensors", 1.0)]
    assert parse(text).adapters == request.adapters


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ink", "must be a JSON list of \\{name, scale, weight_name\\} objects"),
        ('[{"name": "ink"', "must be a JSON list"),
        ('{"name": "ink"}', "valid list"),
        ('[{"name": "ink", "scale": 9}]', "less than or equal to 4"),
    ],
)
def test_loras_text_that_is_not_a_list_of_adapters_is_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        ImageEditRequest.parse_form({"prompt": "p", "loras": text})
    assert caught.value.param is not None and caught.value.param.startswith("loras")


def test_deeply_nested_loras_text_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        ImageEditRequest.parse_form({"prompt": "p", "loras": "[" * 100_000})
    assert caught.value.param == "loras"


def adapter(
    path: Path, rank: int = 4, modules: tuple[str, ...] = (Q,), features: tuple[int, int] = (8, 16)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for module in modules:
        tensors[f"transformer.{module}.lora_A.weight"] = np.ones((rank, features[0]), np.float32)
        tensors[f"transformer.{module}.lora_B.weight"] = np.ones((features[1], rank), np.float32)
    save_file(tensors, str(path))
    return path


def model(max_rank: int = 8, targets: dict[str, tuple[int, int]] | None = None) -> ModelInfo:
    return ModelInfo(
        name="flux", family="flux-dev", repo="r", tier="L", default_steps=28, default_guidance=3.5,
        native_width=1024, native_height=1024, size_multiple=16, min_size=256, max_size=2048, max_steps=200,
        supports_negative_prompt=False, max_batch=4, lora_max_rank=max_rank,
        lora_targets=TARGETS if targets is None else targets,
    )  # fmt: skip


@pytest.fixture
def resolver(tmp_path: Path) -> AdapterResolver:
    loras = tmp_path / "loras"
    adapter(loras / "ink.safetensors", rank=4)
    adapter(loras / "wide.safetensors", rank=6, modules=(Q, K))
    adapter(loras / "huge.safetensors", rank=16)
    adapter(loras / "sdxl.safetensors", modules=("down_blocks.0.attentions.0.proj_in",))
    adapter(loras / "narrow.safetensors", features=(4, 16))
    adapter(loras / "set" / "a.safetensors", rank=2, modules=(K,))
    adapter(loras / "set" / "b.safetensors", rank=1)
    (loras / "broken.safetensors").write_bytes(b"\x05\x00")
    return AdapterResolver(Settings(lora_dir=str(loras), lora_max_rank=8))


def test_adapters_resolve_in_the_requests_order(resolver: AdapterResolver, tmp_path: Path) -> None:
    uses = resolver.resolve(model(), [("set", "a.safetensors", -1.0), ("ink", None, 0.5)])
    assert uses == (
        LoraUse("set:a.safetensors", str((tmp_path / "loras" / "set" / "a.safetensors").resolve()), -1.0),
        LoraUse("ink", str((tmp_path / "loras" / "ink.safetensors").resolve()), 0.5),
    )
    assert resolver.resolve(model(), []) == ()


@pytest.mark.parametrize(
    ("name", "weight_name", "message"),
    [
        ("nope", None, "adapter 'nope': no adapter named 'nope' in LORA_DIR"),
        ("set", None, "no adapter named 'set'"),
        ("set", "c.safetensors", "no file 'c.safetensors' in adapter folder 'set'"),
        ("../ink", None, "is not an adapter name"),
        ("broken", None, "not a safetensors file"),
        ("sdxl", None, "which this model does not have or does not adapt"),
        ("narrow", None, "4→16, the model's is 8→16"),
        ("huge", None, "rank 16 is above this server's LORA_MAX_RANK of 8"),
    ],
)
def test_an_unusable_adapter_names_its_place_in_loras(
    resolver: AdapterResolver, name: str, weight_name: str | None, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        resolver.resolve(model(), [("ink", None, 1.0), (name, weight_name, 1.0)])
    assert caught.value.param == "loras.1.name"


def test_ranks_adding_up_above_the_maximum_in_a_layer_are_refused(resolver: AdapterResolver) -> None:
    assert len(resolver.resolve(model(), [("set", "a.safetensors", 1.0), ("wide", None, 1.0)])) == 2
    with pytest.raises(
        InvalidRequest, match=f"add up to 11 in '{Q}', above this server's LORA_MAX_RANK of 8"
    ) as caught:
        resolver.resolve(model(), [("set", "b.safetensors", 1.0), ("ink", None, 1.0), ("wide", None, 1.0)])
    assert caught.value.param == "loras.2.name"


def test_a_model_without_adapters_refuses_loras(resolver: AdapterResolver) -> None:
    with pytest.raises(InvalidRequest, match="model flux \\(flux-dev\\) takes no adapters") as caught:
        resolver.resolve(model(max_rank=0), [("ink", None, 1.0)])
    assert caught.value.param == "loras"


def test_a_server_without_adapters_refuses_loras() -> None:
    resolver = AdapterResolver(Settings(lora_dir=None, loras=[]))
    assert not resolver.enabled
    with pytest.raises(InvalidRequest, match="start it with LORA_DIR or --lora NAME=PATH") as caught:
        resolver.resolve(model(), [("ink", None, 1.0)])
    assert caught.value.param == "loras"


def test_adapters_read_at_start_are_checked_by_name(tmp_path: Path) -> None:
    good = adapter(tmp_path / "good.safetensors")
    AdapterResolver(Settings(loras=[f"good={good}"])).check_preloaded()
    (tmp_path / "bad.safetensors").write_text("not an adapter")
    resolver = AdapterResolver(Settings(loras=[f"good={good}", f"bad={tmp_path / 'bad.safetensors'}"]))
    with pytest.raises(ValueError, match=r"LORAS \(--lora\): adapter 'bad' .*not a safetensors file"):
        resolver.check_preloaded()


def test_describe_lists_each_adapter_with_the_models_it_fits(resolver: AdapterResolver) -> None:
    other = model(targets={"down_blocks.0.attentions.0.proj_in": (8, 16)})
    other.name = "sdxl"
    listed = {entry["id"]: entry for entry in resolver.describe([model(), other])}
    assert set(listed) == {"ink", "wide", "huge", "sdxl", "narrow", "set/a", "set/b", "broken"}
    ink = {"id": "ink", "object": "lora", "rank": 4, "layers": 1, "bytes": 4 * (4 * 8 + 16 * 4)}
    assert listed["ink"] == {**ink, "models": ["flux"]}
    assert listed["wide"]["layers"] == 2
    assert listed["sdxl"]["models"] == ["sdxl"]
    assert listed["huge"]["models"] == [] and listed["narrow"]["models"] == []
    assert "not a safetensors file" in listed["broken"]["error"]
