"""Where a FLUX.1-schnell request's serving time goes on one GPU host, part by part (no HTTP).

    python benchmarks/gpu_profile.py --out $OUT            # ~7 min on an H200

1. Encoders on the host's CPU, 1024², on a photo (realistic) and on noise (what random weights give):
   Pillow WebP at efforts 0-2, Pillow PNG, diffuserve's PNG (one core and parallel), JPEG on the CPU and
   on the GPU (nvJPEG through torchvision), and a batch of 4 encoded in parallel.
2. nvJPEG correctness: the GPU JPEG decodes close to the CPU JPEG, and stays byte-identical over repeats
   while other kernels run on other streams (reports of corrupted output come from unsynchronised streams).
3. Random-weight FLUX.1-schnell, tier L (as served): build, tier, cold compile per batch size; the bare
   pipeline call to PIL images against the server's path (tensor output, uint8 on the device), with the
   decode split off by the engine's own DecodeClock.
4. Compile variants of the repeated blocks on the same model: today's default, max-autotune GEMMs without
   CUDA graphs, and with CUDA graphs; per-step time from step-end events.

Raw results: --out/profile.json (rewritten after every part, so a timeout keeps what was done).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffuserve.bench.content import noise_picture, photo_mosaic  # noqa: E402
from diffuserve.engine.encode import encode_pixels, encode_png  # noqa: E402
from diffuserve.engine.frames import DecodeClock, to_uint8  # noqa: E402

REPO = "black-forest-labs/FLUX.1-schnell"
RESULTS: dict[str, Any] = {}


def save(out: Path) -> None:
    (out / "profile.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median_ms(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def pil_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def pil_webp(pixels: np.ndarray, method: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "WEBP", quality=90, method=method)
    return buffer.getvalue()


def encoders(repeats: int) -> dict[str, Any]:
    from torchvision.io import encode_jpeg

    pool = ThreadPoolExecutor(8)
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    for name, pixels in (("photo", photo_mosaic()), ("noise", noise_picture())):
        chw_cpu = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        chw_gpu = chw_cpu.cuda()
        cases: dict[str, Any] = {
            "webp_m0": lambda p=pixels: pil_webp(p, 0),
            "webp_m1": lambda p=pixels: pil_webp(p, 1),
            "webp_m2": lambda p=pixels: pil_webp(p, 2),
            "png_pillow_l1": lambda p=pixels: pil_png(p),
            "png_diffuserve_1core": lambda p=pixels: encode_png(p, 1),
            "png_diffuserve_pool8": lambda p=pixels: encode_png(p, 1, pool=pool),
            "jpeg_pillow_q90": lambda p=pixels: encode_pixels(p, "jpeg"),
            "jpeg_torchvision_cpu": lambda c=chw_cpu: encode_jpeg(c, quality=90).numpy().tobytes(),
            "jpeg_nvjpeg": lambda c=chw_gpu: encode_jpeg(c, quality=90).cpu().numpy().tobytes(),
        }
        rows: dict[str, Any] = {}
        for label, fn in cases.items():
            data = fn()
            rows[label] = {"ms": median_ms(fn, repeats), "bytes": len(data)}
        # A batch of 4 through a pool of 4: what the worker's encoder stage does per batch.
        batch_pool = ThreadPoolExecutor(4)
        for fmt in ("webp", "png", "jpeg"):

            def four(p: np.ndarray = pixels, f: str = fmt, bp: ThreadPoolExecutor = batch_pool) -> None:
                list(bp.map(lambda _i: encode_pixels(p, f, pool=pool), range(4)))

            rows[f"batch4_{fmt}"] = {"ms": median_ms(four, max(3, repeats // 2))}
        out[name] = rows
        log(f"encoders {name}: {json.dumps(rows)}")
    return out


def nvjpeg_check(iterations: int) -> dict[str, Any]:
    from PIL import Image
    from torchvision.io import encode_jpeg

    pixels = photo_mosaic()
    batch = torch.from_numpy(np.stack([pixels, np.ascontiguousarray(pixels[::-1])])).permute(0, 3, 1, 2)
    gpu = batch.cuda().contiguous()
    reference = [encode_jpeg(img, quality=90).numpy().tobytes() for img in batch]
    first = [t.cpu().numpy().tobytes() for t in encode_jpeg(list(gpu), quality=90)]

    def psnr(data: bytes, source: np.ndarray) -> float:
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)
        mse = float(((decoded - source) ** 2).mean())
        return round(10 * np.log10(255**2 / mse), 2) if mse else float("inf")

    # Other streams busy with matmuls and copies while the encoder runs: the output must not change.
    stop = threading.Event()

    def load() -> None:
        stream = torch.cuda.Stream()
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.cuda.stream(stream):
            while not stop.is_set():
                (a @ a).sum().item()

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    mismatches = 0
    try:
        for _ in range(iterations):
            fresh = gpu.clone()  # written just before the encode, on the default stream
            got = [t.cpu().numpy().tobytes() for t in encode_jpeg(list(fresh), quality=90)]
            mismatches += sum(g != f for g, f in zip(got, first, strict=True))
    finally:
        stop.set()
        thread.join()
    sources = [pixels, pixels[::-1]]
    return {
        "iterations": iterations,
        "byte_mismatches_vs_first": mismatches,
        "psnr_gpu_db": [psnr(d, s) for d, s in zip(first, sources, strict=True)],
        "psnr_cpu_db": [psnr(d, s) for d, s in zip(reference, sources, strict=True)],
        "bytes_gpu": [len(d) for d in first],
        "bytes_cpu": [len(d) for d in reference],
    }


def call(pipe: Any, batch: int, steps: int, output_type: str, on_step: Any = None) -> Any:
    kwargs: dict[str, Any] = {
        "prompt": ["a photo of a red fox in the snow"] * batch,
        "height": 1024,
        "width": 1024,
        "num_inference_steps": steps,
        "guidance_scale": 0.0,
        "max_sequence_length": 256,
        "generator": [torch.Generator("cpu").manual_seed(i) for i in range(batch)],
        "output_type": output_type,
    }
    if on_step is not None:
        kwargs["callback_on_step_end"] = on_step
    return pipe(**kwargs).images


def serving_paths(pipe: Any, repeats: int) -> dict[str, Any]:
    """The bare pipeline call (PIL images, as diffusers users call it) vs the engine's path."""
    clock = DecodeClock(pipe, "cuda")
    out: dict[str, Any] = {}
    for batch in (1, 4):

        def bare(b: int = batch) -> None:
            call(pipe, b, 4, "pil")
            torch.cuda.synchronize()

        def engine_path(b: int = batch) -> None:
            clock.start()
            images = call(pipe, b, 4, "pt")
            to_uint8(images)
            out.setdefault(f"b{b}_decode_ms", []).append(round(clock.decode_ms(clock.finished()), 2))

        out[f"b{batch}_bare_pil_ms"] = median_ms(bare, repeats)
        out[f"b{batch}_engine_uint8_ms"] = median_ms(engine_path, repeats)
        log(
            f"serving paths b{batch}: {json.dumps({k: v for k, v in out.items() if k.startswith(f'b{batch}')})}"
        )
    return out


def step_times(pipe: Any, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        events: list[Any] = []

        def on_step(
            _p: Any, _i: int, _t: Any, kw: dict[str, Any], marks: list[Any] = events
        ) -> dict[str, Any]:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
            return kw

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call(pipe, batch, steps, "pt", on_step)
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) * 1000
        span = events[0].elapsed_time(events[-1]) / (len(events) - 1)
        runs.append({"total_ms": round(total, 1), "ms_per_step": round(span, 2)})
    return {
        "batch": batch,
        "steps": steps,
        "runs": runs,
        "median_ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
    }


class Timeout(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise Timeout("part took too long")


def compile_variant(pipe: Any, mode: str | None, budget_s: int) -> dict[str, Any]:
    from diffuserve.engine.tiers import denoiser_of

    torch._dynamo.reset()
    model = denoiser_of(pipe)
    names = set(model._repeated_blocks)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(budget_s)
    result: dict[str, Any] = {"mode": mode or "default"}
    try:
        for module in model.modules():
            if type(module).__name__ in names:
                module.compile(dynamic=False, mode=mode)
        t0 = time.perf_counter()
        call(pipe, 1, 2, "pt")
        torch.cuda.synchronize()
        result["compile_b1_s"] = round(time.perf_counter() - t0, 1)
        result["b1"] = step_times(pipe, 1, 8, 3)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        signal.alarm(0)
    log(f"compile variant {result}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--parts", default="encoders,nvjpeg,pipeline,variants")
    parser.add_argument("--variant-budget-s", type=int, default=150)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    import diffusers
    import torchvision

    RESULTS["env"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    if "encoders" in parts:
        RESULTS["encoders"] = encoders(args.repeats)
        save(out)
    if "nvjpeg" in parts:
        RESULTS["nvjpeg"] = nvjpeg_check(50)
        log(f"nvjpeg: {RESULTS['nvjpeg']}")
        save(out)
    if not parts & {"pipeline", "variants"}:
        return 0
    from diffuserve.engine.tiers import apply_recipe, recipe_for
    from diffuserve.models.random_weights import build_random_pipeline

    start: dict[str, Any] = {}
    t0 = time.perf_counter()
    pipe = build_random_pipeline(REPO, device="cuda", dtype=torch.bfloat16, seed=0)
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    start["build_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    start["notes"] = apply_recipe(pipe, recipe_for("L"), device="cuda", cache_dir=str(out / "cache"))
    start["tier_s"] = round(time.perf_counter() - t0, 1)
    for batch in (4, 3, 2, 1):
        t0 = time.perf_counter()
        call(pipe, batch, 4 if batch == 4 else 1, "pt")
        torch.cuda.synchronize()
        start[f"warmup_b{batch}_s"] = round(time.perf_counter() - t0, 1)
    RESULTS["start_cold"] = start
    log(f"start: {start}")
    save(out)
    if "pipeline" in parts:
        RESULTS["serving_paths"] = serving_paths(pipe, args.repeats)
        RESULTS["steps_default"] = step_times(pipe, 1, 8, 3)
        save(out)
    if "variants" in parts:
        RESULTS["variants"] = []
        for mode in ("max-autotune-no-cudagraphs", "max-autotune"):
            RESULTS["variants"].append(compile_variant(pipe, mode, args.variant_budget_s))
            save(out)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
