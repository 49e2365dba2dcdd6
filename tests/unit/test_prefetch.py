"""Weights read ahead of the load: which files, whole files from disk, files in the page cache skipped,
nothing read where the files would not fit in memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from diffuserve.engine import prefetch
from diffuserve.engine.loader import weights_bytes


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\1" * size)
    return path


def test_the_safetensors_of_every_component_in_path_order(tmp_path: Path) -> None:
    write(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", 10)
    write(tmp_path / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors", 10)
    write(tmp_path / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors", 10)
    write(tmp_path / "transformer" / "diffusion_pytorch_model.bin", 99)  # diffusers loads the safetensors
    write(tmp_path / "tokenizer" / "vocab.json", 5)
    names = [f.relative_to(tmp_path).as_posix() for f in prefetch.weight_files(str(tmp_path))]
    assert names == [
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert weights_bytes(str(tmp_path)) == 30
    assert prefetch.weight_files("digits") == [] and prefetch.weight_files(str(tmp_path / "none")) == []


def test_a_pickle_only_folder_reads_its_pickles(tmp_path: Path) -> None:
    write(tmp_path / "unet" / "diffusion_pytorch_model.bin", 10)
    assert [f.name for f in prefetch.weight_files(str(tmp_path))] == ["diffusion_pytorch_model.bin"]


def test_files_are_read_through_but_those_in_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefetch, "CHUNK", 1024)
    files = [write(tmp_path / f"{i}.safetensors", 64 * 1024 + 7) for i in range(3)]
    shares = {files[0]: 0.0, files[1]: 1.0, files[2]: None}  # on disk, cached, no mincore: read
    monkeypatch.setattr(prefetch, "resident_share", shares.__getitem__)
    result = prefetch.prefetch(files)
    assert (result.files, result.read_bytes, result.cached_files) == (3, 2 * (64 * 1024 + 7), 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) as Linux has it")
def test_a_file_just_written_is_in_the_page_cache(tmp_path: Path) -> None:
    share = prefetch.resident_share(write(tmp_path / "w.safetensors", 3 * 4096 + 5))
    assert share is not None and share >= prefetch.CACHED_SHARE
    assert prefetch.resident_share(write(tmp_path / "empty.safetensors", 0)) == 1.0


def test_an_unreadable_file_is_left_to_the_loader(tmp_path: Path) -> None:
    result = prefetch.prefetch([tmp_path / "gone.safetensors"])
    assert (result.files, result.read_bytes) == (1, 0)


def test_no_reader_without_files_or_without_the_memory_for_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert prefetch.start_prefetch(str(tmp_path)) is None
    write(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", 1000)
    assert prefetch.start_prefetch(str(tmp_path)) is None  # no model_index.json: not a pipeline folder
    write(tmp_path / "model_index.json", 2)
    monkeypatch.setattr(prefetch, "available_memory", lambda: 1000)
    assert prefetch.start_prefetch(str(tmp_path)) is None
    monkeypatch.setattr(prefetch, "available_memory", lambda: 10**9)
    thread = prefetch.start_prefetch(str(tmp_path))
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
