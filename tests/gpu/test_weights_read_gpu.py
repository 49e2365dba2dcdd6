"""safetensors read onto a CUDA GPU through pinned buffers (engine.weights_read): the tensors safetensors gives,
with reads split and grouped across threads and buffers reused; a folder through the loader, directly or from
the read started beside the imports (engine.early_read), as diffusers loads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffuserve.engine import weights_read

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_pinned_reads_give_safetensors_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_read, "CHUNK", 256 << 10)
    tensors = {f"layer{i}.weight": torch.randn(300 + i, 257).to(torch.bfloat16) for i in range(40)}
    tensors |= {f"layer{i}.bias": torch.randn(7 + i) for i in range(40)}
    tensors["large"] = torch.randn(1024, 1024)  # 4 MiB: split over many reads of one buffer each
    paths = []
    for part in range(3):
        path = tmp_path / f"part{part}.safetensors"
        save_file({k: v for i, (k, v) in enumerate(sorted(tensors.items())) if i % 3 == part}, str(path))
        paths.append(path)
    got = weights_read.read_tensors(paths, "cuda", threads=4)
    for path in paths:
        for name, tensor in load_file(str(path)).items():
            assert got[name].device.type == "cuda" and torch.equal(got[name].cpu(), tensor), name


def test_a_folder_loads_onto_the_gpu_as_from_pretrained_gives_it(tmp_path: Path) -> None:
    """The engine's loader (diffusers models read directly) against diffusers' own load of one folder: the same
    tensors, and the same image for the same seed."""
    from diffusers import DiffusionPipeline

    from diffuserve.engine.loader import load_pipeline
    from diffuserve.models.tiny_flux import build_tiny_flux

    folder = tmp_path / "pipeline"
    build_tiny_flux(seed=0).to(torch.bfloat16).save_pretrained(folder)
    ours = load_pipeline(str(folder), device="cuda", dtype_name="bfloat16", weights="pretrained").pipeline
    theirs = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        mine, reference = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert mine.keys() == reference.keys(), name
        assert all(torch.equal(mine[key], reference[key]) for key in mine), name
        assert all(t.device.type == "cuda" for t in mine.values()), name

    def image(pipeline: object) -> torch.Tensor:
        generator = torch.Generator("cuda").manual_seed(0)
        return pipeline("a digit 3", num_inference_steps=2, generator=generator, output_type="pt").images  # type: ignore[operator]

    assert torch.equal(image(ours), image(theirs))


def test_the_load_takes_what_was_read_beside_the_imports(tmp_path: Path) -> None:
    """A worker's early read (engine.early_read, started before the imports) is what the loader builds the
    diffusers models from: the tensors of diffusers' own load, on the worker's GPU."""
    from diffusers import DiffusionPipeline

    from diffuserve.engine.early_read import start_early_read
    from diffuserve.engine.loader import load_pipeline
    from diffuserve.models.tiny_flux import build_tiny_flux

    folder = tmp_path / "pipeline"
    build_tiny_flux(seed=0).to(torch.bfloat16).save_pretrained(folder)
    device = f"cuda:{torch.cuda.current_device()}"
    assert start_early_read(str(folder), device, torch.bfloat16) is not None
    loaded = load_pipeline(str(folder), device="cuda", dtype_name="bfloat16", weights="pretrained")
    assert loaded.early_read is not None and loaded.early_read.gigabytes > 0
    theirs = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    for name in ("transformer", "vae"):
        mine, reference = getattr(loaded.pipeline, name).state_dict(), getattr(theirs, name).state_dict()
        assert mine.keys() == reference.keys(), name
        assert all(torch.equal(mine[key], reference[key]) for key in mine), name
        assert all(t.device == torch.device(device) for t in mine.values()), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_the_callers_current_device_is_where_the_tensors_go(tmp_path: Path) -> None:
    """A worker on its GPU (set_device) reads "cuda" onto that GPU, though the reading threads start on GPU 0."""
    path = tmp_path / "one.safetensors"
    save_file({"a": torch.randn(1000)}, str(path))
    previous = torch.cuda.current_device()
    torch.cuda.set_device(1)
    try:
        got = weights_read.read_tensors([path], "cuda")
    finally:
        torch.cuda.set_device(previous)
    assert got["a"].device == torch.device("cuda", 1)
    assert torch.equal(got["a"].cpu(), load_file(str(path))["a"])
