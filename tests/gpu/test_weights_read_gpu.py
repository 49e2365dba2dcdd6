"""safetensors read onto a CUDA GPU through pinned buffers (engine.weights_read): the tensors safetensors gives,
with reads split and grouped across threads and buffers reused."""

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
