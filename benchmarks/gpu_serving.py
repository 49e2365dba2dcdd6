"""The serving tax on one GPU: the bare pipeline call against the HTTP round trip, throughput against the
GPU-bound rate, and the start-up phases, all measured in one run.

    python benchmarks/gpu_serving.py --out $OUT     # random FLUX.1-schnell, tier L, MODEL_BATCH=4, ~4 min (H200)
    python benchmarks/gpu_serving.py --out /tmp/s --model-repo digits --tier XL --size 32   # CPU dry run

1. Cold start: `diffuserve serve` with an empty cache dir, time to ready and the worker's phases.
2. Lone requests per output format (raw image bytes, as curl gets them; also JSON for WebP), each with the
   server's own split (server-timing: queue, denoise, decode, encode, transfer, respond).
3. Closed loop at 1, 4 and 8 users (every user sends its next request when the last is back).
4. The bare pipeline (what a diffusers user calls: PIL images), in a fresh process on the same GPU, batch 1
   and MODEL_BATCH, with the same tier and compile cache; then the encoder stage's cost per format on a photo
   and on noise (random weights make noise, which encodes slower than a picture: 2.4x for WebP, 1.5x for PNG).
5. Warm start: the server again with the cache dir of the first start.

The tax of a lone request = HTTP round trip - bare pipeline time. Random weights give noise, so the tax on
realistic content is also given: the same round trip with the encode measured on noise replaced by the
encode of the photo. Raw output: --out/serving.json; the table: --out/serving.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402

from diffuserve.bench.server import SpawnedServer  # noqa: E402

FORMATS = ("webp", "png", "jpeg")
PROMPT = "a photo of a red fox in the snow"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def serve_args(args: argparse.Namespace, cache_dir: str) -> list[str]:
    flags = ["--model-repo", args.model_repo, "--tier", args.tier, "--model-batch", str(args.model_batch)]
    flags += ["--cache-dir", cache_dir, "--devices", args.devices]
    if args.weights:
        flags += ["--weights", args.weights]
    return flags


def start_server(
    args: argparse.Namespace, cache_dir: str, label: str
) -> tuple[SpawnedServer, dict[str, Any]]:
    server = SpawnedServer(
        Path(args.out) / f"server-{label}.log",
        env={"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])},
        ready_timeout=args.ready_timeout,
        serve_args=serve_args(args, cache_dir),
        stop_grace=30,
    )
    started = time.perf_counter()
    server.__enter__()
    ready_s = time.perf_counter() - started
    workers = httpx.get(f"{server.base_url}/health/ready", timeout=10).json()["workers"]
    info = {"ready_s": round(ready_s, 2), "worker_phases_s": [w.get("start_seconds") for w in workers]}
    log(f"{label} start: {json.dumps(info)}")
    return server, info


def lone_requests(base: str, args: argparse.Namespace) -> dict[str, Any]:
    url = f"{base}/v1/images/generations"
    size = f"{args.size}x{args.size}"
    out: dict[str, Any] = {}
    with httpx.Client() as client:
        cases = [(fmt, "*/*", fmt) for fmt in FORMATS] + [("webp", "application/json", "webp_json")]
        for fmt, accept, label in cases:
            runs = []
            for i in range(args.lone + 1):
                body = {"prompt": PROMPT, "seed": 100 + i, "size": size, "output_format": fmt}
                runs.append(post(client, url, body, accept))
            out[label] = runs[1:]  # the first of each format warms that encoder's path in the API process
            log(f"lone {label}: {[r['round_trip_ms'] for r in runs[1:]]}")
    return out


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
        "p50_ms": round(statistics.median(r["round_trip_ms"] for r in ok), 1) if ok else None,
        "batch_sizes": sorted(r["batch_size"] for r in ok),
    }
    log(f"closed loop: {json.dumps(summary)}")
    return summary


def bare_pipeline(args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    """Runs in a fresh process: the pipeline as a diffusers user calls it, with the server's tier."""
    import torch

    from diffuserve.bench.content import noise_picture, photo_mosaic
    from diffuserve.engine.encoder import BatchEncoder
    from diffuserve.engine.loader import load_pipeline
    from diffuserve.engine.tiers import Tier, apply_tier

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_pipeline(
        args.model_repo, device=device, dtype_name="auto", weights=args.weights or "pretrained", hf_token=None
    )
    pipe = loaded.pipeline
    apply_tier(pipe, Tier(args.tier), device=device, cache_dir=cache_dir)
    family = loaded.family

    def call(batch: int) -> None:
        kwargs: dict[str, Any] = {
            "prompt": [PROMPT] * batch,
            "height": args.size,
            "width": args.size,
            "num_inference_steps": family.default_steps,
            "guidance_scale": family.default_guidance,
            "generator": [torch.Generator("cpu").manual_seed(i) for i in range(batch)],
            "output_type": "pil",
        }
        if family.max_sequence_length:
            kwargs["max_sequence_length"] = family.max_sequence_length
        pipe(**kwargs)
        if device == "cuda":
            torch.cuda.synchronize()

    out: dict[str, Any] = {}
    for batch, repeats in ((1, args.lone), (args.model_batch, max(2, args.lone // 2))):
        call(batch)  # compiles (or loads from the cache) this batch size
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call(batch)
            times.append((time.perf_counter() - t0) * 1000)
        out[f"b{batch}_ms"] = [round(t, 1) for t in times]
        out[f"b{batch}_median_ms"] = round(statistics.median(times), 1)
    encoder = BatchEncoder()
    for name, picture in (("photo", photo_mosaic(args.size)), ("noise", noise_picture(args.size))):
        pixels = picture[None]
        for fmt in FORMATS:
            encoder.encode(pixels, [(fmt, None)])
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                encoder.encode(pixels, [(fmt, None)])
                times.append((time.perf_counter() - t0) * 1000)
            out[f"encode_{name}_{fmt}_ms"] = round(statistics.median(times), 2)
    return out


def run_bare(args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--bare", "--cache-dir", cache_dir, "--out", args.out]
    cmd += ["--model-repo", args.model_repo, "--tier", args.tier, "--model-batch", str(args.model_batch)]
    cmd += ["--size", str(args.size), "--lone", str(args.lone)]
    if args.weights:
        cmd += ["--weights", args.weights]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ready_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BARE ")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr[-3000:]}
    return json.loads(lines[-1][len("BARE ") :])


def tax_table(results: dict[str, Any]) -> str:
    bare = results.get("bare", {})
    base = bare.get("b1_median_ms")
    rows = ["| request | HTTP round trip p50 ms | tax ms (noise) | tax % | tax ms (photo) | tax % (photo) |"]
    rows.append("|---|---:|---:|---:|---:|---:|")
    for label, runs in results.get("lone", {}).items():
        fmt = label.split("_")[0]
        ok = [r for r in runs if r["status"] == 200]
        if not ok or not base:
            continue
        round_trip = statistics.median(r["round_trip_ms"] for r in ok)
        encode = statistics.median(r["timing"].get("encode", 0.0) for r in ok)
        # JPEG is encoded on the GPU in the server: the bare process's CPU encoder says nothing of it.
        photo = (
            round_trip if fmt == "jpeg" else round_trip - encode + bare.get(f"encode_photo_{fmt}_ms", encode)
        )
        rows.append(
            f"| {label} | {round_trip:.1f} | {round_trip - base:.1f} | {100 * (round_trip - base) / base:.1f} "
            f"| {photo - base:.1f} | {100 * (photo - base) / base:.1f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--model-repo", default="black-forest-labs/FLUX.1-schnell")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--tier", default="L")
    parser.add_argument("--model-batch", type=int, default=4)
    parser.add_argument("--devices", default="0")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--lone", type=int, default=5, help="timed lone requests per format")
    parser.add_argument("--users", default="1,4,8")
    parser.add_argument("--per-user", type=int, default=4, help="requests each closed-loop user sends")
    parser.add_argument("--ready-timeout", type=float, default=400)
    parser.add_argument("--cache-dir", default=None, help="(internal) cache dir of the bare-pipeline process")
    parser.add_argument("--bare", action="store_true", help="(internal) run the bare pipeline part only")
    args = parser.parse_args()
    if args.weights == "pretrained":
        args.weights = ""
    if args.bare:
        print("BARE " + json.dumps(bare_pipeline(args, args.cache_dir)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": vars(args), "env": environment()}

    def save() -> None:
        (out / "serving.json").write_text(json.dumps(results, indent=1))

    cache_dir = tempfile.mkdtemp(prefix="diffuserve-cache-")
    server, results["cold_start"] = start_server(args, cache_dir, "cold")
    try:
        results["lone"] = lone_requests(server.base_url, args)
        save()
        results["closed_loop"] = [
            closed_loop(server.base_url, int(u), args.per_user, args.size) for u in args.users.split(",")
        ]
        save()
    finally:
        server.stop()
    results["bare"] = bare_pipeline_or_error(args, cache_dir)
    log(f"bare: {json.dumps(results['bare'])}")
    save()
    server, results["warm_start"] = start_server(args, cache_dir, "warm")
    server.stop()
    bare = results["bare"]
    if "b1_median_ms" in bare:
        rate = args.model_batch / (bare[f"b{args.model_batch}_median_ms"] / 1000)
        results["gpu_bound_images_per_s"] = round(rate, 3)
        for step in results["closed_loop"]:
            step["of_gpu_bound"] = round(step["images_per_s"] / rate, 3)
    save()
    (out / "serving.md").write_text(tax_table(results) + "\n")
    log("tax:\n" + tax_table(results))
    log(f"throughput: {json.dumps(results['closed_loop'])}")
    return 0


def bare_pipeline_or_error(args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    try:
        return run_bare(args, cache_dir)
    except subprocess.TimeoutExpired:
        return {"error": "bare pipeline process timed out"}


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    info["python"] = platform.python_version()
    info["cpus"] = os.cpu_count()
    try:
        import diffusers
        import torch

        info.update(torch=torch.__version__, diffusers=diffusers.__version__)
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    with contextlib.suppress(OSError):
        info["git"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return info


if __name__ == "__main__":
    sys.exit(main())
