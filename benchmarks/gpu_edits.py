"""What edits and streamed previews cost on the device: FLUX.1-schnell (random weights), 1024², batch 1, through
the engine a worker runs (its compute part: denoise, decode, uint8 pixels in host memory; no HTTP, no encoding).

    python benchmarks/gpu_edits.py --out $OUT [--tier L] [--repeats 5]     # ~3 min on an H200

Measured in one run, against the plain generation of the same run: a generation with 1, 2 and 3 previews
(each one VAE decode of the clean-image estimate, copied to host memory), image-to-image at strength 0.5
(half of the schedule runs) and 1.0, and inpainting with half the picture masked.

Raw results: --out/edits.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffuserve.bench.content import photo_mosaic  # noqa: E402
from diffuserve.config import Settings  # noqa: E402
from diffuserve.engine.engine import DeviceBatch, Engine  # noqa: E402
from diffuserve.types import BatchItem, BatchJob, Task  # noqa: E402

REPO = "black-forest-labs/FLUX.1-schnell"
SIZE = 1024
STEPS = 4


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions() -> dict[str, str]:
    import diffusers

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def job(task: Task = Task.GENERATE, strength: float = 1.0, previews: int = 0) -> BatchJob:
    picture = photo_mosaic(SIZE)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255
    item = BatchItem(
        "bench", "a lighthouse on a cliff at dusk", None, [7], "webp", None,
        init_images=[picture] if task is not Task.GENERATE else None,
        mask=mask if task is Task.INPAINT else None,
        partial_images=previews,
    )  # fmt: skip
    return BatchJob(1, SIZE, SIZE, STEPS, 0.0, [item], task, strength)


def device_ms(engine: Engine, batch: BatchJob, repeats: int) -> dict[str, Any]:
    taken: list[Any] = []
    times = []
    for _ in range(repeats + 1):  # the first run of each shape warms it
        taken.clear()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = engine.compute(batch, on_preview=taken.append)
        if not isinstance(result, DeviceBatch):
            raise RuntimeError(f"batch failed: {result.error}")
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times[1:]), 1), "runs_ms": [round(t, 1) for t in times[1:]],
            "previews": sum(len(b.previews) for b in taken)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tier", default="L")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"versions": versions(), "model": REPO, "tier": args.tier, "size": SIZE,
                               "steps": STEPS, "batch": 1, "cases": {}}  # fmt: skip
    settings = Settings(model_repo=REPO, weights="random", model_size=args.tier, model_batch=1, warmup=False)
    engine = Engine(settings, "cuda:0")
    started = time.perf_counter()
    engine.load()
    results["load_s"] = round(time.perf_counter() - started, 1)
    cases = {
        "generate": job(),
        "generate, 1 preview": job(previews=1),
        "generate, 2 previews": job(previews=2),
        "generate, 3 previews": job(previews=3),
        "image-to-image, strength 0.5": job(Task.IMAGE_TO_IMAGE, 0.5),
        "image-to-image, strength 1.0": job(Task.IMAGE_TO_IMAGE, 1.0),
        "inpainting, half masked, strength 1.0": job(Task.INPAINT, 1.0),
    }
    for name, batch in cases.items():
        results["cases"][name] = device_ms(engine, batch, args.repeats)
        log(f"{name}: {results['cases'][name]}")
        (args.out / "edits.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
