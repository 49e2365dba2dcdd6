"""What the benchmarks share: the project's source on the path, a log line, the software and card a run used,
raw output files, requests to a running server, and test pictures for the encoders (a photo and noise)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The working tree's code, also where an installed diffuserve is older.
sys.path.insert(0, str(ROOT / "src"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def out_dir(path: str | None) -> Path:
    """Where raw output goes: --out, else $OUT (the GPU machines' output folder), else bench-out/."""
    out = Path(path or os.environ.get("OUT") or "bench-out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def environment() -> dict[str, Any]:
    """The card, software, commit and time of a run, recorded in its raw output."""
    import diffusers
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "commit": _commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = "absent"
    return info


def _commit() -> str:
    """`git describe` of the tree, or BENCH_COMMIT where the tree was copied without its history (a GPU
    machine's copy of a working tree can carry an older HEAD)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
    log(f"wrote {path}")


def median_cuda_ms(call: Callable[[], object], warmup: int, iters: int) -> float:
    """The median milliseconds of `iters` calls between CUDA events, after `warmup` calls."""
    import torch

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


PROMPT = "a photo of a red fox in the snow"


def server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def post(client: httpx.Client, url: str, body: dict[str, Any], accept: str = "*/*") -> dict[str, Any]:
    started = time.perf_counter()
    response = client.post(url, json=body, headers={"Accept": accept}, timeout=600)
    round_trip = (time.perf_counter() - started) * 1000
    return {
        "status": response.status_code,
        "round_trip_ms": round(round_trip, 2),
        "bytes": len(response.content),
        "timing": server_timing(response.headers.get("server-timing", "")),
        "batch_size": int(response.headers.get("x-batch-size", "0") or 0),
    }


def closed_loop(base: str, users: int, per_user: int, size: int) -> dict[str, Any]:
    url = f"{base}/v1/images/generations"
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def user(index: int) -> None:
        with httpx.Client() as client:
            for i in range(per_user):
                body = {"prompt": PROMPT, "seed": 1000 * index + i, "size": f"{size}x{size}"}
                result = post(client, url, body)
                result["done_at"] = time.perf_counter()
                with lock:
                    results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = max(r["done_at"] for r in results) - started
    ok = [r for r in results if r["status"] == 200]
    summary = {
        "users": users,
        "requests": len(results),
        "failures": len(results) - len(ok),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(len(ok) / elapsed, 3),
        "p50_ms": round(median([r["round_trip_ms"] for r in ok]), 1) if ok else None,
        "batch_sizes": sorted(r["batch_size"] for r in ok),
    }
    log(f"closed loop: {json.dumps(summary)}")
    return summary


def photo_mosaic(size: int = 1024) -> np.ndarray:
    """A size×size×3 uint8 photograph: four crops of the two photos scikit-learn ships (a temple in China
    and a flower), each scaled by only 1.2×, so textures and edges stay those of a real picture.

    A random-weight model makes noise, which encodes 2-3× slower than a picture does; encoder costs that
    matter to users are measured on this.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images  # 427×640 each
    half = size // 2
    tiles = [
        np.asarray(Image.fromarray(photo[:, columns]).resize((half, half), Image.Resampling.BICUBIC))
        for photo, columns in (
            (china, slice(0, 512)),
            (flower, slice(0, 512)),
            (flower, slice(128, 640)),
            (china, slice(128, 640)),
        )
    ]
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def noise_picture(size: int = 1024, seed: int = 0) -> np.ndarray:
    """What a random-weight model's images look like to an encoder: uniform noise."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
