"""Adapter files read without torch: the safetensors header's bounds, the key layouts, alpha and scale."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from diffuserve.loras import files
from diffuserve.loras.files import AdapterError, AdapterLayout, check_layout, read_header, read_layout

Q = "transformer_blocks.0.attn.to_q"
FF = "transformer_blocks.0.ff.net.0.proj"


def pair(module: str, rank: int = 4, features: tuple[int, int] = (8, 16), **kw: Any) -> dict[str, np.ndarray]:
    """A PEFT pair for `module`: lora_A (rank, in), lora_B (out, rank); `prefix`, `parts`, `dtype` vary it."""
    prefix, (down, up) = kw.get("prefix", "transformer."), kw.get("parts", ("lora_A", "lora_B"))
    dtype = kw.get("dtype", np.float32)
    return {
        f"{prefix}{module}.{down}.weight": np.full((rank, features[0]), 0.5, dtype),
        f"{prefix}{module}.{up}.weight": np.full((features[1], rank), 0.25, dtype),
    }


def saved(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def config(**values: Any) -> dict[str, str]:
    """diffusers' metadata: PEFT's LoraConfig as JSON, its keys prefixed by the component."""
    return {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in values.items()})}


def raw(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    """A file of an 8-byte header length (the true one unless given), a header (JSON unless bytes), data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def bf16(values: list[float]) -> bytes:
    return (np.array(values, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def test_peft_layout_lists_each_module_with_its_rank_features_and_bytes(tmp_path: Path) -> None:
    path = saved(tmp_path / "a.safetensors", {**pair(Q, 4, (8, 16)), **pair(FF, 8, (8, 32))})
    layout = read_layout(path)
    assert set(layout.modules) == {Q, FF}
    q, ff = layout.modules[Q], layout.modules[FF]
    assert (q.rank, q.in_features, q.out_features, q.scale) == (4, 8, 16, 1.0)
    assert (ff.rank, ff.in_features, ff.out_features) == (8, 8, 32)
    assert (q.down, q.up) == (f"transformer.{Q}.lora_A.weight", f"transformer.{Q}.lora_B.weight")
    assert layout.rank == 8
    assert layout.nbytes == 4 * (4 * 8 + 16 * 4 + 8 * 8 + 32 * 8)
    assert layout.path == str(path)


@pytest.mark.parametrize("prefix", ["transformer.", "unet.", "", "base_model.model."])
def test_keys_with_or_without_the_component_name_the_same_module(tmp_path: Path, prefix: str) -> None:
    layout = read_layout(saved(tmp_path / "a.safetensors", pair(Q, prefix=prefix)))
    assert list(layout.modules) == [Q]


def test_peft_keys_holding_the_adapter_name_are_read(tmp_path: Path) -> None:
    tensors = pair(Q, parts=("lora_A.default_0", "lora_B.default_0"))
    assert list(read_layout(saved(tmp_path / "a.safetensors", tensors)).modules) == [Q]


def test_older_lora_down_up_layout_is_read(tmp_path: Path) -> None:
    path = saved(
        tmp_path / "a.safetensors", pair(Q, 2, (8, 16), parts=("lora_down", "lora_up"), dtype=np.float16)
    )
    module = read_layout(path).modules[Q]
    assert (module.rank, module.in_features, module.out_features) == (2, 8, 16)
    assert module.down.endswith("lora_down.weight") and module.up.endswith("lora_up.weight")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_alpha_tensor_sets_the_scale(tmp_path: Path, dtype: type) -> None:
    tensors = {**pair(Q, 4), f"transformer.{Q}.alpha": np.array(2.0, dtype)}
    assert read_layout(saved(tmp_path / "a.safetensors", tensors)).modules[Q].scale == 0.5


def test_bf16_alpha_tensor_sets_the_scale(tmp_path: Path) -> None:
    a, b = np.zeros((4, 8), np.float32).tobytes(), np.zeros((16, 4), np.float32).tobytes()
    header = {
        f"{Q}.lora_A.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
        f"{Q}.lora_B.weight": {"dtype": "F32", "shape": [16, 4], "data_offsets": [128, 384]},
        f"{Q}.alpha": {"dtype": "BF16", "shape": [1], "data_offsets": [384, 386]},
    }
    layout = read_layout(raw(tmp_path / "a.safetensors", header, a + b + bf16([12.0])))
    assert layout.modules[Q].scale == 3.0


def test_alpha_from_the_metadata_and_its_pattern(tmp_path: Path) -> None:
    tensors = {**pair(Q, 4), **pair(FF, 4, (8, 32))}
    metadata = config(r=4, lora_alpha=8, alpha_pattern={"ff.net.0.proj": 2})
    layout = read_layout(saved(tmp_path / "a.safetensors", tensors, metadata))
    assert layout.modules[Q].scale == 2.0
    assert layout.modules[FF].scale == 0.5


def test_alpha_tensor_wins_over_the_metadata(tmp_path: Path) -> None:
    tensors = {**pair(Q, 4), f"{Q}.alpha": np.array(1.0, np.float32)}
    layout = read_layout(saved(tmp_path / "a.safetensors", tensors, config(lora_alpha=8)))
    assert layout.modules[Q].scale == 0.25


def test_without_alpha_the_scale_is_one(tmp_path: Path) -> None:
    path = saved(tmp_path / "a.safetensors", pair(Q, 16), {"format": "pt"})
    assert read_layout(path).modules[Q].scale == 1.0


def test_rslora_divides_by_the_root_of_the_rank(tmp_path: Path) -> None:
    path = saved(tmp_path / "a.safetensors", pair(Q, 16), config(lora_alpha=8, use_rslora=True))
    assert read_layout(path).modules[Q].scale == pytest.approx(8 / math.sqrt(16))
    plain = saved(tmp_path / "b.safetensors", pair(Q, 16), config(lora_alpha=8, use_rslora=False))
    assert read_layout(plain).modules[Q].scale == 0.5


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"lora_adapter_metadata": "{not json"}, "lora_adapter_metadata is not JSON"),
        ({"lora_adapter_metadata": "[1, 2]"}, "lora_adapter_metadata is not a JSON object"),
        (config(lora_alpha="eight"), "lora_alpha is not a number"),
        ({"lora_adapter_metadata": '{"lora_alpha": 1' + "0" * 400 + "}"}, "lora_alpha is not a number"),
        (config(alpha_pattern={"[": 2}), "alpha_pattern key '\\[' is not a pattern"),
        (config(alpha_pattern={"to_q": "x"}), "alpha_pattern value for 'to_q' is not a number"),
        (config(lora_alpha=float("nan")), "scale that is not a finite number"),
    ],
)
def test_unusable_adapter_metadata_is_refused(tmp_path: Path, metadata: dict[str, str], message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        read_layout(saved(tmp_path / "a.safetensors", pair(Q), metadata))


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (np.array([1.0, 2.0], np.float32), "is not a scalar"),
        (np.array(2, np.int32), "an alpha\\) has dtype I32"),
        (np.array(np.inf, np.float32), "not a finite number"),
    ],
)
def test_unusable_alpha_tensor_is_refused(tmp_path: Path, alpha: np.ndarray, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        read_layout(saved(tmp_path / "a.safetensors", {**pair(Q), f"{Q}.alpha": alpha}))


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path / "a.safetensors", pair(Q))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AdapterError, match="lies outside the file: it is truncated"):
        read_layout(path)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_file_shorter_than_the_header_length_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "a.safetensors").write_bytes(content)
    with pytest.raises(AdapterError, match="shorter than its header"):
        read_header(tmp_path / "a.safetensors")


def test_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = raw(tmp_path / "a.safetensors", {}, length=10_000)
    with pytest.raises(AdapterError, match="header length is out of bounds"):
        read_header(path)
    with pytest.raises(AdapterError, match="header length is out of bounds"):
        read_header(raw(tmp_path / "b.safetensors", {}, length=2**63))


def test_header_above_the_bound_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = saved(tmp_path / "a.safetensors", pair(Q))
    assert read_header(path)[0]
    monkeypatch.setattr(files, "MAX_HEADER_BYTES", 32)
    with pytest.raises(AdapterError, match="header length is out of bounds"):
        read_header(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{not json", "its header is not JSON"),
        (b'{"a": "\xff\xfe"}', "its header is not JSON"),
        (b"[1, 2, 3]", "its header is not a JSON object"),
        (b'{"__metadata__": "x"}', "its __metadata__ is not a JSON object"),
        (b'{"__metadata__": [1]}', "its __metadata__ is not a JSON object"),
    ],
)
def test_header_that_is_not_a_json_object_is_refused(tmp_path: Path, header: bytes, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        read_header(raw(tmp_path / "a.safetensors", header, b"\0" * 16))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("F32", "malformed"),
        ({"dtype": "F32", "shape": [1]}, "malformed"),
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "malformed"),
        ({"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}, "malformed"),
        ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}, "malformed"),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, "malformed"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, "malformed"),
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "dtype 'C64', not one this server reads"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "lies outside the file"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, "lies outside the file"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [False, True]}, "lies outside the file"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}, "lies outside the file"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "has 4 bytes for shape \\[2\\] F32"),
    ],
)
def test_malformed_tensor_entries_are_refused_naming_the_tensor(
    tmp_path: Path, entry: Any, message: str
) -> None:
    path = raw(tmp_path / "a.safetensors", {f"{Q}.lora_A.weight": entry}, b"\0" * 8)
    with pytest.raises(AdapterError, match=message) as caught:
        read_header(path)
    assert "lora_A.weight" in str(caught.value)


def test_header_entries_and_metadata_are_returned(tmp_path: Path) -> None:
    path = saved(tmp_path / "a.safetensors", pair(Q, 2, (3, 5)), {"format": "pt"})
    tensors, metadata, data_start = read_header(path)
    down = tensors[f"transformer.{Q}.lora_A.weight"]
    assert (down.dtype, down.shape, down.end - down.start) == ("F32", (2, 3), 24)
    assert metadata == {"format": "pt"}
    assert data_start == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_a_and_b_whose_ranks_differ_are_refused(tmp_path: Path) -> None:
    tensors = {
        f"{Q}.lora_A.weight": np.zeros((4, 8), np.float32),
        f"{Q}.lora_B.weight": np.zeros((16, 2), np.float32),
    }
    with pytest.raises(
        AdapterError, match=r"shapes \[4, 8\] and \[16, 2\], not \(rank, in\) and \(out, rank\)"
    ):
        read_layout(saved(tmp_path / "a.safetensors", tensors))


@pytest.mark.parametrize(
    ("down", "up"),
    [((4, 8, 1), (16, 4)), ((8,), (16, 8)), ((0, 8), (16, 0))],
)
def test_weights_that_are_not_matrices_of_a_rank_are_refused(
    tmp_path: Path, down: tuple[int, ...], up: tuple[int, ...]
) -> None:
    tensors = {
        f"{Q}.lora_A.weight": np.zeros(down, np.float32),
        f"{Q}.lora_B.weight": np.zeros(up, np.float32),
    }
    with pytest.raises(AdapterError, match=f"module '{Q}' has shapes"):
        read_layout(saved(tmp_path / "a.safetensors", tensors))


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.bool_])
def test_weights_of_a_non_float_dtype_are_refused(tmp_path: Path, dtype: type) -> None:
    with pytest.raises(AdapterError, match="a LoRA weight is a float tensor"):
        read_layout(saved(tmp_path / "a.safetensors", pair(Q, dtype=dtype)))


def test_a_without_b_is_refused(tmp_path: Path) -> None:
    tensors = {f"{Q}.lora_A.weight": np.zeros((4, 8), np.float32)}
    with pytest.raises(AdapterError, match=f"module '{Q}' has no lora_B \\(up\\) weight"):
        read_layout(saved(tmp_path / "a.safetensors", tensors))
    tensors = {f"{Q}.lora_up.weight": np.zeros((16, 4), np.float32)}
    with pytest.raises(AdapterError, match="has no lora_A \\(down\\) weight"):
        read_layout(saved(tmp_path / "b.safetensors", tensors))


def test_a_module_given_twice_is_refused(tmp_path: Path) -> None:
    tensors = {**pair(Q, prefix="transformer."), **pair(Q, prefix="")}
    with pytest.raises(AdapterError, match=f"module '{Q}' has two down weights"):
        read_layout(saved(tmp_path / "a.safetensors", tensors))


def test_files_without_lora_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="holds no tensors"):
        read_layout(raw(tmp_path / "a.safetensors", {"__metadata__": {"format": "pt"}}))
    alpha_only = {f"transformer.{Q}.alpha": np.array(4.0, np.float32)}
    with pytest.raises(AdapterError, match="holds no LoRA weights"):
        read_layout(saved(tmp_path / "b.safetensors", alpha_only))


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "text_encoder_3"])
def test_text_encoder_keys_are_refused(tmp_path: Path, component: str) -> None:
    tensors = {**pair(Q), **pair("text_model.encoder.layers.0.self_attn.q_proj", prefix=f"{component}.")}
    with pytest.raises(
        AdapterError, match=r"adapts the text encoder .*only the denoiser's layers can be adapted"
    ):
        read_layout(saved(tmp_path / "a.safetensors", tensors))


@pytest.mark.parametrize(
    ("keys", "layout"),
    [
        (
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"],
            "kohya's",
        ),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "kohya's"),
        (["lora_transformer_single_transformer_blocks_0_proj_out.lora_A.weight"], "kohya's"),
        (["double_blocks.0.processor.proj_lora1.down.weight"], "XLabs'"),
        (["double_blocks.0.img_attn.qkv.lora_A.weight", "double_blocks.0.img_attn.qkv.lora_B.weight"],
         "BFL's"),
        (["single_blocks.0.linear1.lora_A.weight", "single_blocks.0.linear1.lora_B.weight"], "BFL's"),
        (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], "BFL's"),
    ],
)  # fmt: skip
def test_other_trainers_layouts_are_refused_naming_the_layout(
    tmp_path: Path, keys: list[str], layout: str
) -> None:
    tensors = {key: np.zeros((4, 4), np.float32) for key in keys}
    with pytest.raises(AdapterError, match=f"{layout}.* layout, not diffusers': convert it with diffusers"):
        read_layout(saved(tmp_path / "a.safetensors", tensors))


@pytest.mark.parametrize(
    "key",
    [
        f"{Q}.lora_magnitude_vector",
        f"{Q}.lora_magnitude_vector.weight",
        f"{Q}.diff",
        f"{Q}.diff_b",
        f"{Q}.lora_B.bias",
    ],
)
def test_dora_and_difference_keys_are_refused(tmp_path: Path, key: str) -> None:
    tensors = {**pair(Q, prefix=""), key: np.zeros(16, np.float32)}
    with pytest.raises(AdapterError, match="other than a LoRA product \\(full or DoRA differences\\)"):
        read_layout(saved(tmp_path / "a.safetensors", tensors))


def test_other_keys_are_refused_naming_the_expected_layout(tmp_path: Path) -> None:
    tensors = {**pair(Q), f"{Q}.weight": np.zeros((16, 8), np.float32)}
    with pytest.raises(AdapterError, match=r"is not a LoRA weight \(expected <module>\.lora_A\.weight"):
        read_layout(saved(tmp_path / "a.safetensors", tensors))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_values_that_are_not_finite_are_refused_when_checked(tmp_path: Path, dtype: type, bad: float) -> None:
    tensors = pair(Q, dtype=dtype)
    up = f"transformer.{Q}.lora_B.weight"
    tensors[up][3, 1] = bad
    path = saved(tmp_path / "a.safetensors", tensors)
    assert read_layout(path).modules[Q].rank == 4
    with pytest.raises(AdapterError, match=f"tensor '{up}' holds values that are not finite"):
        read_layout(path, check_values=True)


def test_bf16_values_that_are_not_finite_are_refused_when_checked(tmp_path: Path) -> None:
    header = {
        "a.lora_A.weight": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [0, 4]},
        "a.lora_B.weight": {"dtype": "BF16", "shape": [2, 1], "data_offsets": [4, 8]},
    }
    finite = raw(tmp_path / "a.safetensors", header, bf16([1.0, -2.5, 3e38, -1e-30]))
    assert read_layout(finite, check_values=True).modules["a"].rank == 1
    for name, bad in (("nan", math.nan), ("inf", math.inf)):
        path = raw(tmp_path / f"{name}.safetensors", header, bf16([1.0, 2.0, 0.5, bad]))
        with pytest.raises(AdapterError, match=r"'a\.lora_B\.weight' holds values that are not finite"):
            read_layout(path, check_values=True)


def test_a_value_past_the_first_chunk_is_checked(tmp_path: Path) -> None:
    count = (1 << 22) + 5
    tensors = {
        "a.lora_A.weight": np.zeros((1, count), np.float16),
        "a.lora_B.weight": np.zeros((2, 1), np.float16),
    }
    tensors["a.lora_A.weight"][0, count - 1] = np.nan
    with pytest.raises(AdapterError, match=r"'a\.lora_A\.weight' holds values that are not finite"):
        read_layout(saved(tmp_path / "a.safetensors", tensors), check_values=True)


@pytest.fixture
def layout(tmp_path: Path) -> AdapterLayout:
    return read_layout(saved(tmp_path / "a.safetensors", {**pair(Q, 4, (8, 16)), **pair(FF, 8, (8, 32))}))


TARGETS = {Q: (8, 16), FF: (8, 32), "transformer_blocks.0.attn.to_k": (8, 16)}


def test_an_adapter_of_the_models_layers_fits(layout: AdapterLayout) -> None:
    check_layout(layout, TARGETS, max_rank=8)


def test_a_module_the_model_does_not_adapt_is_refused_naming_it(layout: AdapterLayout) -> None:
    targets = {Q: (8, 16)}
    with pytest.raises(
        AdapterError, match=f"it changes '{FF}', which this model does not have .*another base"
    ):
        check_layout(layout, targets, max_rank=64)


def test_a_module_of_another_shape_is_refused_naming_both(layout: AdapterLayout) -> None:
    targets = {**TARGETS, FF: (8, 64)}
    with pytest.raises(AdapterError, match=f"its '{FF}' is 8→32, the model's is 8→64: .*another base model"):
        check_layout(layout, targets, max_rank=64)


def test_a_rank_above_the_maximum_is_refused(layout: AdapterLayout) -> None:
    with pytest.raises(AdapterError, match="its rank 8 is above this server's LORA_MAX_RANK of 7"):
        check_layout(layout, TARGETS, max_rank=7)
