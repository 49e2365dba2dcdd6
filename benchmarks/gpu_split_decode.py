"""The VAE decode of one image on one GPU against the same decode split by rows across a group's GPUs
(diffuserve.engine.split_decode, DistVAE's patch parallelism), measured in one run.

    python benchmarks/gpu_split_decode.py --out $OUT            # 2 GPUs: random FLUX VAE in bf16, 1024²
    python benchmarks/gpu_split_decode.py --out /tmp/d --cpu --size 128 --reps 2   # two CPU processes, gloo

Variants, each timed on every rank (CUDA events around `vae.decode` of the latents, the ranks meeting at a
barrier before each decode): whole = rank 0 decodes alone (the group with PARALLEL_DECODE=off); joint = the
group's decode as it ships (DistVAE's convolutions and this project's group norms, `BandGroupNorm`);
joint-distvae = DistVAE's own group norms; and with -channels-last the same with the VAE's weights in
channels-last memory format. Each variant's pixels (0-255 levels, as served) are compared with whole's.
Raw output: --out/split_decode.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffuserve.serving.worker_group import free_port  # noqa: E402
from gpu_serving import environment, log  # noqa: E402

VARIANTS = ("whole", "joint", "joint-distvae", "whole-channels-last", "joint-channels-last")


def levels(images: Any) -> Any:
    """[-1, 1] decoder output as the 0-255 levels a served image has."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round()


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from diffuserve.engine.frames import plain_decode
    from diffuserve.engine.split_decode import split_vae_decode
    from diffuserve.models.architectures import FLUX_VAE, build_vae

    device = "cpu" if args.cpu else f"cuda:{rank}"
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
        **({"device_id": torch.device(device)} if cuda else {}),
    )
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)  # every rank the same weights, made on the CPU
    vae = build_vae(FLUX_VAE).to(device, dtype)
    side = args.size // 8
    latents = torch.randn(1, FLUX_VAE.latent_channels, side, side, generator=torch.Generator().manual_seed(1))
    latents = latents.to(device, dtype)
    results: dict[str, Any] = {}
    reference = None

    def timed(decode: Any, alone: bool) -> tuple[list[float], Any]:
        times, images = [], None
        for i in range(args.warmup + args.reps):
            dist.barrier()
            if alone and rank != 0:
                continue
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                images = decode(latents, return_dict=False)[0]
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                import time

                began = time.perf_counter()
                images = decode(latents, return_dict=False)[0]
                elapsed = (time.perf_counter() - began) * 1000
            if i >= args.warmup:
                times.append(elapsed)
        return times, images

    with torch.no_grad():
        for variant in args.variants:
            if variant.endswith("channels-last") != getattr(vae, "_bench_channels_last", False):
                channels_last = variant.endswith("channels-last")
                vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                vae._bench_channels_last = channels_last
            if variant.startswith("whole"):
                times, images = timed(plain_decode(vae), alone=True)
            else:
                pipeline = type("Pipeline", (), {"vae": vae})()
                why = split_vae_decode(pipeline, world, fused_norms=variant != "joint-distvae")
                assert why is None, why
                times, images = timed(vae.decode, alone=False)
                vae.decode = plain_decode(vae)  # the next variant starts from the plain decode again
            if rank != 0:
                continue
            pixels = levels(images)
            if reference is None:
                reference = pixels
            difference = (pixels - reference).abs()
            results[variant] = {
                "median_ms": round(statistics.median(times), 2),
                "min_ms": round(min(times), 2),
                "ms": [round(t, 2) for t in times],
                "max_levels_from_first": int(difference.max()),
                "mean_levels_from_first": round(float(difference.mean()), 4),
            }
            log(
                f"{variant}: {results[variant]['median_ms']} ms, {results[variant]['max_levels_from_first']} max"
            )
    if rank == 0:
        out["results"] = results
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--world", type=int, default=2, help="ranks (GPUs)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="the first is the pixels' reference")
    parser.add_argument(
        "--cpu", action="store_true", help="CPU processes over gloo (a dry run of the script)"
    )
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(VARIANTS):
        parser.error(f"variants are {', '.join(VARIANTS)}")
    import torch.multiprocessing as torch_mp

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = torch_mp.Manager().dict()
    torch_mp.spawn(rank_main, args=(args.world, free_port(), args, shared), nprocs=args.world)
    result = {"args": vars(args), "env": environment(), "results": shared.get("results", {})}
    (out_dir / "split_decode.json").write_text(json.dumps(result, indent=1))
    log(json.dumps(result["results"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
