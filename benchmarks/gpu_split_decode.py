"""The VAE decode of one image on one GPU against the same decode split by rows across a group's GPUs
(diffuserve.engine.parallel.split_decode, DistVAE's patch parallelism), measured in one run.

    python benchmarks/gpu_split_decode.py --out $OUT --reps 20    # 2 GPUs: random FLUX VAE in bf16, 1024²
    python benchmarks/gpu_split_decode.py --out /tmp/d --cpu --size 128 --reps 2   # two CPU processes, gloo

Two variants, each timed on every rank (CUDA events around `vae.decode` of the latents, the ranks meeting at a
barrier before each decode): whole = rank 0 decodes alone (a group with PARALLEL_DECODE=off); joint = the
group's decode as it ships (`split_vae_decode`: DistVAE's convolutions and this project's group norms). The
joint decode's pixels (0-255 levels, as served) are compared with whole's.
Raw output: --out/split_decode.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from typing import Any

from common import environment, log, median, out_dir, write_json
from diffuserve.serving.worker_group import free_port

VARIANTS = ("whole", "joint")  # the first is the pixels' reference


def levels(images: Any) -> Any:
    """[-1, 1] decoder output as the 0-255 levels a served image has."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round()


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from diffuserve.engine.frames import plain_decode
    from diffuserve.engine.parallel.split_decode import split_vae_decode
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
                began = time.perf_counter()
                images = decode(latents, return_dict=False)[0]
                elapsed = (time.perf_counter() - began) * 1000
            if i >= args.warmup:
                times.append(elapsed)
        return times, images

    with torch.no_grad():
        for variant in VARIANTS:
            if variant == "whole":
                times, images = timed(plain_decode(vae), alone=True)
            else:
                why = split_vae_decode(type("Pipeline", (), {"vae": vae})(), world)
                assert why is None, why
                times, images = timed(vae.decode, alone=False)
            if rank != 0:
                continue
            pixels = levels(images)
            if reference is None:
                reference = pixels
            difference = (pixels - reference).abs()
            results[variant] = {
                "median_ms": round(median(times), 2),
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
    parser.add_argument("--out", default=None)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--world", type=int, default=2, help="ranks (GPUs)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--cpu", action="store_true", help="CPU processes over gloo (a dry run of the script)"
    )
    args = parser.parse_args()
    out = out_dir(args.out)
    args.out = str(out)
    import torch.multiprocessing as torch_mp

    shared = torch_mp.Manager().dict()
    torch_mp.spawn(rank_main, args=(args.world, free_port(), args, shared), nprocs=args.world)
    result = {"args": vars(args), "environment": environment(), "results": shared.get("results", {})}
    write_json(out / "split_decode.json", result)
    log(json.dumps(result["results"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
