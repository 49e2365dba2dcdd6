"""A folder's diffusers models read while the worker imports (engine.early_read): the load takes those tensors
instead of reading the files, gets the models from_pretrained gives, reads again where the early read failed,
and frees a read it does not take."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from diffuserve.engine import direct_load, early_read
from diffuserve.engine.config import DType, EngineConfig, Weights
from diffuserve.engine.early_read import start_early_read, take_early_read
from diffuserve.engine.loader import load_pipeline
from diffuserve.engine.weights_read import WeightsFormatError
from diffuserve.serving.worker_process import read_weights_early
from tests.fake_hub import tiny_pipeline_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def nothing_pending() -> Iterator[None]:
    yield
    leftover = early_read._pending
    early_read._pending = None
    if leftover is not None:
        leftover.discard()


def reference_models(folder: Path) -> Any:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)


def assert_same_weights(models: dict[str, Any], reference: Any) -> None:
    for name, model in models.items():
        ours, theirs = model.state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name


def refuse_to_read(*args: object, **kwargs: object) -> None:
    raise AssertionError("the load read the files again")


def test_the_load_takes_the_tensors_read_early(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = start_early_read(str(folder), "cpu", torch.float32)
    assert started is not None and set(started.files) == {"transformer", "vae"}
    # Largest first (a real folder's transformer): the read the imports hide best is the longest.
    sizes = [sum(f.stat().st_size for f in files) for files in started.files.values()]
    assert sizes == sorted(sizes, reverse=True)
    early = take_early_read(str(folder), "cpu", torch.float32)
    assert early is started
    assert take_early_read(str(folder), "cpu", torch.float32) is None  # handed over once
    monkeypatch.setattr(direct_load, "read_tensors", refuse_to_read)
    models = direct_load.load_models(folder, torch.float32, "cpu", early.take)
    assert set(models) == {"transformer", "vae"}
    assert_same_weights(models, reference_models(folder))
    done = early.discard()
    sizes = sum(
        f.stat().st_size for name in ("transformer", "vae") for f in (folder / name).glob("*.safetensors")
    )
    assert done is not None and done.gigabytes == pytest.approx(sizes / 1e9) and done.seconds > 0


def test_a_read_for_another_folder_device_or_dtype_is_dropped(folder: Path, tmp_path: Path) -> None:
    for path, device, dtype in (
        (str(tmp_path), "cpu", torch.float32),
        (str(folder), "meta", torch.float32),
        (str(folder), "cpu", torch.float16),
    ):
        started = start_early_read(str(folder), "cpu", torch.float32)
        assert started is not None
        assert take_early_read(path, device, dtype) is None
        assert early_read._pending is None and not started._results  # its tensors freed
        assert started.discard() is None  # nothing taken


def test_nothing_is_read_early_that_the_load_would_not_take(folder: Path, tmp_path: Path) -> None:
    # The tiny folder stores float32: served in bfloat16, the direct load leaves it to from_pretrained.
    assert start_early_read(str(folder), "cpu", torch.bfloat16) is None
    assert start_early_read(str(tmp_path), "cpu", torch.float32) is None  # no model_index.json
    assert start_early_read("tiny-random", "cpu", torch.float32) is None
    # A worker reads early only onto a GPU and only real weights: the CPU loader does not read directly.
    config = EngineConfig(model_repo=str(folder), model_name="tiny", dtype=DType.FLOAT32)
    read_weights_early(config, "cpu")
    read_weights_early(replace(config, weights=Weights.RANDOM), "cuda:0")
    assert early_read._pending is None


def test_a_component_whose_early_read_failed_is_read_by_the_load(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = early_read.read_tensors

    def vae_fails(files: list[Path], device: Any) -> dict[str, torch.Tensor]:
        if files[0].parent.name == "vae":  # read first or second, the load reads it again
            raise WeightsFormatError("cut short")
        return real(files, device)

    monkeypatch.setattr(early_read, "read_tensors", vae_fails)
    start_early_read(str(folder), "cpu", torch.float32)
    early = take_early_read(str(folder), "cpu", torch.float32)
    assert early is not None
    models = direct_load.load_models(folder, torch.float32, "cpu", early.take)
    assert set(models) == {"transformer", "vae"}
    assert_same_weights(models, reference_models(folder))
    assert early.taken == ["transformer"]


def test_running_out_of_memory_early_is_raised_by_the_load(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def no_room(files: list[Path], device: Any) -> dict[str, torch.Tensor]:
        calls.append(files[0].parent.name)
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(early_read, "read_tensors", no_room)
    start_early_read(str(folder), "cpu", torch.float32)
    early = take_early_read(str(folder), "cpu", torch.float32)
    assert early is not None
    with pytest.raises(torch.OutOfMemoryError):
        direct_load.load_models(folder, torch.float32, "cpu", early.take)
    assert len(calls) == 1  # the other model is not tried after the GPU ran out


def test_the_loader_frees_a_read_its_path_does_not_use(folder: Path) -> None:
    """On CPU the loader goes through from_pretrained: an early read for the folder is dropped, not kept."""
    started = start_early_read(str(folder), "cpu", torch.float32)
    assert started is not None
    loaded = load_pipeline(str(folder), device="cpu", dtype_name="float32", weights="pretrained")
    assert loaded.early_read is None and early_read._pending is None and not started._results
    assert_same_weights({"transformer": loaded.pipeline.transformer}, reference_models(folder))
