"""The encoders table of docs/benchmarks.md: each image encoder the server has used or uses, on one image of a
photo (realistic) and of noise (what random weights give), on the host's CPU, and JPEG on the GPU (nvJPEG).

    python benchmarks/gpu_profile.py --out $OUT              # ~1 min on a GPU host
    python benchmarks/gpu_profile.py --out /tmp/e --size 256  # CPU only: the nvJPEG parts are skipped

1. Encoders, median of --repeats after one untimed call: WebP at effort 0 (served) and 2 (before), Pillow's PNG
   at zlib level 1 (before), diffuserve's PNG deflated in one piece and in PNG_PIECES pieces on as many
   threads (served), Pillow's JPEG q90 (the CPU fallback), and nvJPEG q90 through the worker's own GPU encoder
   (`diffuserve.engine.frames.gpu_jpeg_encoder`, served on CUDA).
2. nvJPEG check: the same pixels encoded again and again while another CUDA stream runs matmuls must give the
   same bytes every time (reports of corrupted output come from unsynchronised streams), and its PSNR against
   the source next to Pillow's JPEG at the same quality.

Raw output: --out/profile.json (keys environment, encoders, nvjpeg; nvjpeg is null without a GPU).
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from common import environment, log, median, noise_picture, out_dir, photo_mosaic, write_json
from diffuserve.engine.frames import gpu_jpeg_encoder
from diffuserve.serving.codecs import PNG_PIECES, encode_pixels, encode_png


def median_ms(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return round(median(times), 2)


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


def encoders(size: int, repeats: int, nvjpeg: Any) -> dict[str, Any]:
    pool = ThreadPoolExecutor(PNG_PIECES)
    out: dict[str, Any] = {"size": size, "repeats": repeats}
    if nvjpeg is None:
        out["note"] = "no CUDA device (or no torchvision): nvJPEG and its check not measured"
    for name, pixels in (("photo", photo_mosaic(size)), ("noise", noise_picture(size))):
        cases: dict[str, Any] = {
            "webp_m0": lambda p=pixels: encode_pixels(p, "webp"),
            "webp_m2": lambda p=pixels: pil_webp(p, 2),
            "png_pillow_l1": lambda p=pixels: pil_png(p),
            "png_diffuserve_1core": lambda p=pixels: encode_png(p, 1),
            "png_diffuserve_pool8": lambda p=pixels: encode_png(p, 1, pool=pool),
            "jpeg_pillow_q90": lambda p=pixels: encode_pixels(p, "jpeg"),
        }
        if nvjpeg is not None:
            on_device = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous().cuda()
            cases["jpeg_nvjpeg"] = lambda d=on_device: nvjpeg(d, [0], [None])[0]
        rows: dict[str, Any] = {}
        for label, fn in cases.items():
            rows[label] = {"ms": median_ms(fn, repeats), "bytes": len(fn())}
        out[name] = rows
        log(f"encoders {name}: {rows}")
    pool.shutdown()
    return out


def nvjpeg_check(size: int, iterations: int, nvjpeg: Any) -> dict[str, Any]:
    from PIL import Image

    pixels = photo_mosaic(size)
    sources = [pixels, np.ascontiguousarray(pixels[::-1])]
    on_device = torch.from_numpy(np.stack(sources)).permute(0, 3, 1, 2).contiguous().cuda()
    first = nvjpeg(on_device, [0, 1], [None, None])
    if len(first) != 2:
        return {"error": "the GPU encoder failed (see the log)"}
    reference = [encode_pixels(source, "jpeg") for source in sources]  # Pillow, the same quality

    def psnr(data: bytes, source: np.ndarray) -> float:
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)
        mse = float(((decoded - source) ** 2).mean())
        return round(float(10 * np.log10(255**2 / mse)), 2) if mse else float("inf")

    # Another stream busy with matmuls while the encoder runs: the output must not change.
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
            fresh = on_device.clone()  # written just before the encode, on the default stream
            got = nvjpeg(fresh, [0, 1], [None, None])
            mismatches += sum(got.get(i) != first[i] for i in (0, 1))
    finally:
        stop.set()
        thread.join()
    return {
        "iterations": iterations,
        "byte_mismatches_vs_first": mismatches,
        "psnr_gpu_db": [psnr(first[i], s) for i, s in enumerate(sources)],
        "psnr_cpu_db": [psnr(d, s) for d, s in zip(reference, sources, strict=True)],
        "bytes_gpu": [len(first[i]) for i in (0, 1)],
        "bytes_cpu": [len(d) for d in reference],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=50, help="nvJPEG check: encodes under load")
    args = parser.parse_args()
    out = out_dir(args.out)
    nvjpeg = gpu_jpeg_encoder("cuda:0") if torch.cuda.is_available() else None
    env = environment()
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = "absent"
    results: dict[str, Any] = {"environment": env, "encoders": None, "nvjpeg": None}
    results["encoders"] = encoders(args.size, args.repeats, nvjpeg)
    write_json(out / "profile.json", results)
    if nvjpeg is not None:  # else stays null: the encoders' note says why
        results["nvjpeg"] = nvjpeg_check(args.size, args.iterations, nvjpeg)
        log(f"nvjpeg: {results['nvjpeg']}")
        write_json(out / "profile.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
