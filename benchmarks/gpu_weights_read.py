"""How fast a pipeline folder's weights reach the GPU from the page cache, in one process, several ways:

    python benchmarks/gpu_weights_read.py FOLDER --out $OUT

FOLDER is a diffusers pipeline folder (`gpu_startup.py --keep` leaves FLUX.1's under /tmp/diffuserve-startup).
Every file is read once first, so all that follows reads the page cache. Then, timed to a CUDA synchronize:

- the transformer's files with safetensors' `load_file(device="cuda")`, one file after another (what a
  tensor-by-tensor copy from a memory map gives);
- the same files with `engine.weights_read.read_tensors` at 4, 8 and 16 threads (and, at 8, whether every
  tensor equals safetensors');
- the whole pipeline with diffusers' `DiffusionPipeline.from_pretrained(device_map="cuda")`, then with the
  engine's loader (`engine.loader.load_pipeline`: the diffusers models read directly, the rest through
  `from_pretrained`);
- the T5 text encoder alone with transformers' `from_pretrained(device_map="cuda")`.

Raw output: `weights-read.json` (each figure written as soon as it is measured).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from common import environment, log, out_dir, write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = out_dir(args.out) / "weights-read.json"
    folder: Path = args.folder
    files = sorted(folder.glob("*/*.safetensors"), key=os.path.getsize, reverse=True)
    transformer = sorted((folder / "transformer").glob("*.safetensors"))
    report: dict[str, Any] = {
        "environment": environment(),
        "files": [[f"{f.parent.name}/{f.name}", f.stat().st_size] for f in files],
    }

    def record(name: str, seconds: float, size: int) -> None:
        report[name] = {"s": round(seconds, 3), "gbps": round(size / seconds / 1e9, 2)}
        log(f"{name}: {report[name]}")
        write_json(out, report)

    started = time.perf_counter()
    for path in files:  # into the page cache
        with open(path, "rb", buffering=0) as file:
            while file.read(1 << 28):
                pass
    report["cat_gbps"] = round(
        sum(f.stat().st_size for f in files) / (time.perf_counter() - started) / 1e9, 2
    )
    torch.empty(1, device="cuda")
    measure_transformer(transformer, record, report)
    measure_pipelines(folder, files, record, report)
    write_json(out, report)


def measure_transformer(files: list[Path], record: Any, report: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    from diffuserve.engine.weights_read import read_tensors

    size = sum(f.stat().st_size for f in files)
    started = time.perf_counter()
    loaded = [load_file(str(f), device="cuda") for f in files]
    torch.cuda.synchronize()
    record("transformer_load_file_seq", time.perf_counter() - started, size)
    reference = {name: tensor for state in loaded for name, tensor in state.items()}
    del loaded
    for threads in (4, 8, 16):
        started = time.perf_counter()
        got = read_tensors(files, "cuda", threads=threads)
        record(f"transformer_read_tensors_{threads}", time.perf_counter() - started, size)
        if threads == 8:
            report["read_tensors_equal"] = reference.keys() == got.keys() and all(
                torch.equal(reference[name], got[name]) for name in reference
            )
            log(f"equal: {report['read_tensors_equal']}")
        del got
        torch.cuda.empty_cache()
    del reference
    torch.cuda.empty_cache()


def measure_pipelines(folder: Path, files: list[Path], record: Any, report: dict[str, Any]) -> None:
    import diffusers
    import transformers

    from diffuserve.engine.loader import load_pipeline

    logging.basicConfig(level=logging.INFO)  # the engine's loader logs each directly read model's rate
    size = sum(f.stat().st_size for f in files)
    started = time.perf_counter()
    pipeline = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    record("pipeline_diffusers_from_pretrained", time.perf_counter() - started, size)
    del pipeline
    torch.cuda.empty_cache()
    started = time.perf_counter()
    loaded = load_pipeline(str(folder), device="cuda", dtype_name="bfloat16", weights="pretrained")
    torch.cuda.synchronize()
    record("pipeline_diffuserve_load", time.perf_counter() - started, size)
    del loaded
    torch.cuda.empty_cache()
    report["transformers"] = transformers.__version__
    encoder = sorted((folder / "text_encoder_2").glob("*.safetensors"))
    started = time.perf_counter()
    transformers.T5EncoderModel.from_pretrained(
        folder, subfolder="text_encoder_2", dtype=torch.bfloat16, device_map="cuda"
    )
    torch.cuda.synchronize()
    record("t5_from_pretrained", time.perf_counter() - started, sum(f.stat().st_size for f in encoder))


if __name__ == "__main__":
    main()
