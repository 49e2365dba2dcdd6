"""safetensors read straight into tensors (engine.weights_read), and a folder's diffusers models built empty and
filled from them (engine.direct_load): the same tensors and models as safetensors and from_pretrained give, and
anything else left to from_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffuserve.engine import weights_read
from diffuserve.engine.direct_load import load_models, model_files
from diffuserve.engine.weights_read import WeightsFormatError, read_tensors
from tests.fake_hub import tiny_pipeline_folder

MIXED = {
    "big": torch.randn(700, 300).to(torch.bfloat16),
    "ints": torch.arange(7, dtype=torch.int64),
    "small": torch.randn(3),
    "empty": torch.zeros(0),
    "wide": torch.randn(500, 300),
    "flags": torch.tensor([True, False, True]),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline_folder(tmp_path_factory.getbasetemp())


def test_every_dtype_and_size_as_safetensors_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reads smaller than the large tensors: those are split, the small ones grouped into one read.
    monkeypatch.setattr(weights_read, "CHUNK", 64 << 10)
    path = tmp_path / "mixed.safetensors"
    save_file(MIXED, str(path), metadata={"format": "pt"})
    got = read_tensors([path], "cpu", threads=3)
    expected = load_file(str(path))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_tensors_of_several_files_together_and_a_name_twice_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(4)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(2, 2)}, str(tmp_path / "two.safetensors"))
    got = read_tensors([tmp_path / "one.safetensors", tmp_path / "two.safetensors"], "cpu")
    assert torch.equal(got["a"], torch.ones(4)) and torch.equal(got["b"], torch.zeros(2, 2))
    save_file({"a": torch.ones(1)}, str(tmp_path / "again.safetensors"))
    with pytest.raises(WeightsFormatError, match="more than one file"):
        read_tensors([tmp_path / "one.safetensors", tmp_path / "again.safetensors"], "cpu")


def test_a_truncated_or_foreign_file_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsFormatError, match="ends before"):
        read_tensors([path], "cpu")
    lying = tmp_path / "lying.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'
    lying.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(WeightsFormatError, match="not what its shape holds"):
        read_tensors([lying], "cpu")
    gaps = tmp_path / "gaps.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}'
    gaps.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(WeightsFormatError, match="does not start where"):
        read_tensors([gaps], "cpu")
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes((12).to_bytes(8, "little") + b"not json at all")
    with pytest.raises(WeightsFormatError, match="not JSON"):
        read_tensors([foreign], "cpu")


def test_the_folders_diffusers_models_are_those_from_pretrained_gives(folder: Path) -> None:
    from diffusers import DiffusionPipeline

    models = load_models(folder, torch.float32, "cpu")
    assert set(models) == {"transformer", "vae"}  # the text encoders are transformers' classes: left to it
    pipeline = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **models)
    reference = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    for name, model in models.items():
        assert getattr(pipeline, name) is model
        ours, theirs = model.state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
        assert dict(model.config) == dict(getattr(reference, name).config)
        assert not model.training


def test_weights_stored_in_another_dtype_are_left_to_from_pretrained(folder: Path) -> None:
    # The tiny folder holds float32: read whole and cast after, a model would be on the device twice.
    assert load_models(folder, torch.bfloat16, "cpu") == {}


def test_a_model_the_files_do_not_fill_exactly_is_left_to_from_pretrained(
    folder: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "pipeline"
    shutil.copytree(folder, copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["extra.weight"] = torch.ones(1)
    save_file(state, str(weights))
    assert set(load_models(copy, torch.float32, "cpu")) == {"transformer"}


def test_shards_are_those_the_index_names(folder: Path, tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    target = tmp_path / "transformer"
    FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").save_pretrained(
        target, max_shard_size="20KB"
    )
    files = model_files(target)
    assert files is not None and len(files) > 1
    named = set(
        json.loads((target / "diffusion_pytorch_model.safetensors.index.json").read_text())[
            "weight_map"
        ].values()
    )
    assert {f.name for f in files} == named
    (target / files[0].name).unlink()
    assert model_files(target) is None
