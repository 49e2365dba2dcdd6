"""Start-up as a deployment pays it: `diffuserve serve FOLDER` on a local diffusers folder (random weights of the
real architecture, saved once with `save_pretrained`, so the real `from_pretrained` path runs), cold and warm.

    python benchmarks/gpu_startup.py --models flux-schnell,flux-dev --tier L --batch 4 --out $OUT

For each model: the folder is written once (its size and write time recorded); the disk's own read rate is
measured with `dd` (O_DIRECT where the filesystem takes it) on the largest weight file; fresh processes time
the imports a worker pays. Then the server starts:

- `cold`: an empty cache dir (no compile artefacts) and the weights evicted from the page cache
  (`posix_fadvise(DONTNEED)`, which needs no privileges for files this process can open), `--cold-runs`
  times;
- `warm` (`--warm-runs` times): the cache dir the last cold run filled, the weights in the page cache.

Each start is timed from the moment the process is spawned: ready (`/health/ready` 200), the first image
(one request sent at ready, batch 1, native size, a fixed seed: time to its 200), and every batch size warm
(where the server reports warm sizes). The workers' own phases come from `/health/ready`'s `start_seconds`.
Every run's first image is hashed: a warm start from artefacts must give the cold start's bytes (where it
does not, `image_vs_first` says by how much: largest pixel difference, share of pixels, PSNR). Before any
timing, the packages a worker imports get their bytecode compiled (`compileall`, which skips what is up to
date), as an image built by pip or by Modal's `uv_pip_install` has it: an install without bytecode would make
every start's import phase compile the sources again.
Raw output: `startup.json`; `benchmarks/tables.py` renders it.

On CPU (a dry run of the script): `--models digits-folder --device cpu --tier XL --batch 2`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import PROMPT, ROOT, environment, log, out_dir, write_json

MODELS = {
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "digits-folder": "digits",
}
# Imports a worker pays, each timed in a fresh interpreter after one untimed run of them all (files in the
# page cache, bytecode written). "worker" is what a FLUX worker at tier L imports before its weights load.
WORKER_IMPORTS = "import diffuserve.engine.engine; from diffusers import FluxPipeline; import torchao"
IMPORTS = {
    "torch": "import torch",
    "worker": WORKER_IMPORTS,
    "diffuserve api": "import diffuserve.api.app",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="flux-schnell,flux-dev", help=f"comma-separated: {', '.join(MODELS)}"
    )
    parser.add_argument("--tier", default="L")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="0", help="DEVICES for the server (cpu for a dry run)")
    parser.add_argument("--root", default="/tmp/diffuserve-startup", help="where the folders and caches go")
    parser.add_argument(
        "--cold-runs",
        type=int,
        default=1,
        help="cold starts, each from an empty cache dir (a second one says whether two compiles give one image)",
    )
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument("--ready-timeout", type=float, default=400.0)
    parser.add_argument("--keep", action="store_true", help="keep each model's folder after its runs")
    parser.add_argument("--no-imports", action="store_true", help="skip timing the imports")
    parser.add_argument(
        "--lone", type=int, default=5, help="lone HTTP requests timed once every size is warm"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = out_dir(args.out)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "environment": environment(),
        "settings": {"tier": args.tier, "batch": args.batch, "device": args.device},
        # First: the imports' times below are a deployment's, with bytecode.
        "bytecode": compile_bytecode(),
    }
    report["imports"] = {} if args.no_imports else time_imports()
    report["models"] = []
    write_json(out / "startup.json", report)
    for name in args.models.split(","):
        row: dict[str, Any] = {"model": name, "repo": MODELS[name]}
        report["models"].append(row)
        try:
            measure_model(args, name, root, out, row, lambda: write_json(out / "startup.json", report))
        except Exception as exc:  # one model failing must not lose the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name} failed: {row['error']}")
        write_json(out / "startup.json", report)


# The packages a worker and the server import. Images built by pip (the Dockerfile) or by Modal's
# `uv_pip_install` hold their bytecode; an install without it (`pip --no-compile`, uv's default) makes every fresh
# process compile their sources again, which the import phase would then count.
BYTECODE_PACKAGES = (
    "torch", "transformers", "diffusers", "torchao", "accelerate", "safetensors", "huggingface_hub",
    "fastapi", "starlette", "pydantic", "uvicorn", "diffuserve",
)  # fmt: skip


def compile_bytecode() -> dict[str, Any]:
    """Bytecode for the imported packages, as a deployment's image has it (compileall skips what is up to date);
    the seconds it took, and the packages it could not write to."""
    import importlib.util

    folders = []
    for name in BYTECODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            folders += list(spec.submodule_search_locations)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", *folders], capture_output=True, text=True
    )
    seconds = round(time.perf_counter() - started, 2)
    unwritable = sorted({f for f in folders if not os.access(f, os.W_OK)})
    log(f"bytecode: compiled in {seconds:.1f} s ({len(folders)} packages, exit {done.returncode})")
    return {"seconds": seconds, "packages": len(folders), "exit": done.returncode, "unwritable": unwritable}


def time_imports() -> dict[str, Any]:
    """Seconds per import in fresh interpreters, and where a worker's import time goes (`-X importtime`: the
    modules imported at top level that took longest, cumulative)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-c", WORKER_IMPORTS + "; import diffuserve.api.app"], env=env, capture_output=True
    )
    timed: dict[str, Any] = {}
    for name, statement in {"python": "import sys", **IMPORTS}.items():
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", statement], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"import {name}: failed ({done.stderr.strip().splitlines()[-1:]})")
            continue
        timed[name] = round(time.perf_counter() - started, 2)
        log(f"import {name}: {timed[name]:.2f} s")
    profile = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", WORKER_IMPORTS], env=env, capture_output=True, text=True
    )
    timed["worker_profile_s"] = top_level_imports(profile.stderr)
    log(f"worker imports, longest: {json.dumps(timed['worker_profile_s'])}")
    return timed


def top_level_imports(importtime: str, count: int = 15) -> dict[str, float]:
    """The `count` longest top-level entries of `-X importtime` output (cumulative seconds; the profiler's own
    overhead included, so they sum to more than a plain run)."""
    entries: list[tuple[float, str]] = []
    for line in importtime.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[2].startswith(" ") and not fields[2].startswith("  "):
            with contextlib.suppress(ValueError):
                entries.append((int(fields[1]) / 1e6, fields[2].strip()))
    return {name: round(seconds, 2) for seconds, name in sorted(entries, reverse=True)[:count]}


def measure_model(
    args: argparse.Namespace, name: str, root: Path, out: Path, row: dict[str, Any], save: Callable[[], None]
) -> None:
    """The folder, the disk's rate, then the starts; `save` writes the raw output after each (a run cut short
    keeps what it measured)."""
    # The folder's name carries the repo's, as a real download's does: FLUX.1 schnell and dev are told apart by it.
    folder = root / MODELS[name].split("/")[-1]
    row["folder"] = write_folder(MODELS[name], folder, args.device)
    weights = sorted(folder.rglob("*.safetensors"), key=lambda p: p.stat().st_size, reverse=True)
    row["disk"] = disk_rate(weights[0]) if weights else {}
    cache = root / f"cache-{name}"
    row["runs"] = []
    first_pixels: Any = None  # the cold start's first image, to say how far a later one is from it
    for run in ["cold"] * args.cold_runs + ["warm"] * args.warm_runs:
        if run == "cold":
            shutil.rmtree(cache, ignore_errors=True)
            evicted = sum(evict(path) for path in folder.rglob("*") if path.is_file())
            log(f"{name}: {evicted / 1e9:.1f} GB evicted from the page cache")
        result = start_once(args, name, folder, cache, out / f"startup-{name}-{run}-{len(row['runs'])}.log")
        result["run"] = run
        pixels = result.pop("pixels", None)
        if first_pixels is None:
            first_pixels = pixels
        elif pixels is not None:
            result["image_vs_first"] = image_difference(first_pixels, pixels)
        row["runs"].append(result)
        save()
        log(f"{name} {run}: {json.dumps({k: v for k, v in result.items() if k != 'workers'})}")
    hashes = {r.get("image_sha256") for r in row["runs"] if r.get("image_sha256")}
    row["same_image"] = len(hashes) == 1 if hashes else None
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


def write_folder(repo: str, folder: Path, device: str) -> dict[str, Any]:
    """Random weights of `repo`'s architecture saved as a diffusers folder (once: an existing one is reused)."""
    if (folder / "model_index.json").exists():
        return {"path": str(folder), "bytes": folder_bytes(folder), "reused": True}
    import torch

    from diffuserve.models.random_weights import build_random_pipeline
    from diffuserve.models.registry import BUILTIN_MODELS

    started = time.perf_counter()
    if repo in BUILTIN_MODELS:
        pipeline = BUILTIN_MODELS[repo]()
    else:
        target = "cpu" if device == "cpu" else f"cuda:{device.split(',')[0]}"
        pipeline = build_random_pipeline(repo, device=target, dtype=torch.bfloat16)
    built = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    pipeline.save_pretrained(folder, safe_serialization=True)
    os.sync()
    written = time.perf_counter() - started
    del pipeline
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    size = folder_bytes(folder)
    log(f"{repo}: {size / 1e9:.1f} GB written to {folder} in {written:.1f} s (built in {built:.1f} s)")
    return {"path": str(folder), "bytes": size, "build_s": round(built, 2), "write_s": round(written, 2)}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def evict(path: Path) -> int:
    """Drop a file's pages from the page cache (they are clean: nothing is lost); returns its size."""
    with path.open("rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path.stat().st_size


def disk_rate(path: Path) -> dict[str, Any]:
    """The disk's sequential read rate on `path` (GB/s): O_DIRECT where the filesystem takes it, else a read
    after evicting the file; and the page cache's rate, read again at once."""
    size = path.stat().st_size
    rates: dict[str, Any] = {"file": path.name, "bytes": size}
    direct = ["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"]
    evict(path)
    started = time.perf_counter()
    done = subprocess.run(direct, capture_output=True, text=True)
    if done.returncode != 0:
        rates["o_direct"] = False
        evict(path)
        started = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], capture_output=True, check=True)
    else:
        rates["o_direct"] = True
    rates["disk_gb_s"] = round(size / (time.perf_counter() - started) / 1e9, 2)
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], capture_output=True, check=True)
    started = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], capture_output=True, check=True)
    rates["page_cache_gb_s"] = round(size / (time.perf_counter() - started) / 1e9, 2)
    log(f"disk: {json.dumps(rates)}")
    return rates


def start_once(
    args: argparse.Namespace, name: str, folder: Path, cache: Path, log_path: Path
) -> dict[str, Any]:
    """One server start, timed from the spawn: ready, the first image's 200, every batch size warm."""
    import httpx

    from diffuserve.bench.server import SpawnedServer

    serve = [str(folder), "--tier", args.tier, "--model-batch", str(args.batch), "--devices", args.device]
    serve += ["--cache-dir", str(cache), "--no-playground"]
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    server = SpawnedServer(
        log_path, env={"PYTHONPATH": path}, serve_args=serve, ready_timeout=args.ready_timeout
    )
    result: dict[str, Any] = {}
    started = time.perf_counter()
    server.start()
    try:
        seen_phases: list[tuple[float, str]] = []
        poll_ready(server, started, args.ready_timeout, seen_phases)
        result["ready_s"] = round(time.perf_counter() - started, 2)
        # No size: the model's native one, the shape warm-up ran.
        request = {"prompt": PROMPT, "seed": 7, "output_format": "png", "response_format": "b64_json"}
        response = httpx.post(f"{server.base_url}/v1/images/generations", json=request, timeout=300)
        result["first_image_s"] = round(time.perf_counter() - started, 2)
        result["first_image_status"] = response.status_code
        if response.status_code == 200:
            image = response.json()["data"][0]["b64_json"]
            result["image_sha256"] = hashlib.sha256(image.encode()).hexdigest()
            result["pixels"] = decoded(image)
        result["server_timing"] = response.headers.get("server-timing", "")
        all_warm = wait_all_warm(server, started, args.batch, timeout=120.0)
        if all_warm is not None:
            result["all_warm_s"] = round(all_warm, 2)
        # The next start's artefacts: saved after the last size warmed, lost if the server stopped first.
        saved = wait_compile_cache(server, started, timeout=120.0)
        if saved is not None:
            result["compile_cache_saved_s"] = round(saved, 2)
        if args.lone:
            result["lone"] = lone_requests(server.base_url, args.lone)
        final = httpx.get(server.base_url + "/health/ready", timeout=5).json()
        result["workers"] = final.get("workers", [])
        result["phases_seen"] = [{"at_s": round(t, 2), "phase": p} for t, p in seen_phases]
    finally:
        server.stop()
    return result


def decoded(b64_png: str) -> Any:
    """The image's pixels (uint8 array) from its base64 PNG."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB"))


def image_difference(first: Any, other: Any) -> dict[str, Any]:
    """How far `other` is from `first` (same seed, same request): the largest pixel difference (of 255), the
    share of pixels that differ, and the PSNR (dB; None where identical)."""
    import numpy as np

    if first.shape != other.shape:
        return {"shape": [list(first.shape), list(other.shape)]}
    diff = np.abs(first.astype(np.int16) - other.astype(np.int16))
    mse = float((diff.astype(np.float64) ** 2).mean())
    return {
        "max_abs": int(diff.max()),
        "share_differing": round(float((diff.max(axis=-1) > 0).mean()), 6),
        "psnr_db": round(10 * float(np.log10(255**2 / mse)), 2) if mse else None,
    }


def lone_requests(base_url: str, count: int) -> dict[str, Any]:
    """Once every size is warm: lone requests one after another over HTTP (JPEG bytes, the native size), with
    the same prompt (its text-encoder outputs cached after the first) and with a new prompt each time."""
    import httpx

    timed: dict[str, Any] = {}
    with httpx.Client(timeout=300) as client:
        for name, prompt_of in (
            ("same_prompt", lambda i: PROMPT),
            ("new_prompt", lambda i: f"{PROMPT}, take {i}"),
        ):
            seconds, timings = [], []
            for index in range(count + 1):  # the first of each kind is not counted: it fills the cache
                body = {"prompt": prompt_of(index), "seed": index, "output_format": "jpeg"}
                started = time.perf_counter()
                response = client.post(
                    f"{base_url}/v1/images/generations", json=body, headers={"Accept": "image/jpeg"}
                )
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"lone request: HTTP {response.status_code}: {response.text[:200]}")
                if index:
                    seconds.append(round(elapsed, 4))
                    timings.append(response.headers.get("server-timing", ""))
            timed[name] = {"seconds": seconds, "server_timing": timings}
            log(f"lone requests, {name}: {seconds}")
    return timed


def poll_ready(server: Any, started: float, timeout: float, seen: list[tuple[float, str]]) -> dict[str, Any]:
    """Poll /health/ready every 50 ms until 200; notes each new phase a worker reports on the way."""
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}: {server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = httpx.get(server.base_url + "/health/ready", timeout=2.0)
            body = response.json()
            phase = ",".join(str(w.get("phase", w.get("state"))) for w in body.get("workers", []))
            if phase != last:
                seen.append((time.perf_counter() - started, phase))
                last = phase
            if response.status_code == 200:
                return dict(body)
        time.sleep(0.05)
    raise RuntimeError(f"not ready after {timeout:g} s: {server.log_tail()}")


def wait_all_warm(server: Any, started: float, batch: int, timeout: float) -> float | None:
    """Seconds from the spawn until every worker reports every batch size 1..batch warm (None where the server
    does not report warm sizes; then every size was warmed before ready)."""

    def all_warm(workers: list[dict[str, Any]]) -> bool | None:
        sizes = [w.get("warm_batch_sizes") for w in workers]
        if any(s is None for s in sizes):
            return None
        return all(set(range(1, batch + 1)) <= set(s) for s in sizes)

    return wait_for_workers(server, started, timeout, all_warm)


def wait_compile_cache(server: Any, started: float, timeout: float) -> float | None:
    """Seconds from the spawn until every worker reports its compile artefacts saved, or that it has none to
    save (CPU); None: not within `timeout`."""
    return wait_for_workers(
        server, started, timeout, lambda workers: bool(workers) and all("compile_cache" in w for w in workers)
    )


def wait_for_workers(
    server: Any, started: float, timeout: float, done: Callable[[list[dict[str, Any]]], bool | None]
) -> float | None:
    """Polls the readiness body's workers every 50 ms: seconds from the spawn once `done` says True; None once
    it says None (it will never be true) or after `timeout`."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = httpx.get(server.base_url + "/health/ready", timeout=2.0).json().get("workers", [])
        state = done(workers)
        if state is None:
            return None
        if state:
            return time.perf_counter() - started
        time.sleep(0.05)
    return None


if __name__ == "__main__":
    main()
