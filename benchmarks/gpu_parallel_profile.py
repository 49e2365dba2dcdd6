"""Where a context-parallel denoising step spends its time: one worker group's ranks, profiled on rank 0.

    python benchmarks/gpu_parallel_profile.py --out $OUT            # 2 GPUs, random FLUX.1-dev, tier L, 1024²
    python benchmarks/gpu_parallel_profile.py --out /tmp/pp --model-repo digits --tier XL --size 32 --cpu \
        --attention ulysses

Each rank joins the group as a server's worker does (diffuserve.engine.parallel), builds the pipeline and
applies the tier, splits the transformer as a group does (by default as PARALLEL_ATTENTION=auto does with CUDA
graphs, though this profile runs without them), and warms up; then both ranks run the same call while rank 0
records it with torch.profiler. The summary sorts the device time by kind of kernel
(collectives, matrix products, attention, the rest), says how much of the step the device sat idle, and
lists dynamo's graph breaks (a break inside the compiled blocks runs the rest of the block eagerly). It also
times and profiles the same steps without the group, on rank 0 alone, for the one-GPU figure of the same
run; then one rank's share of the work alone (the image 1/ranks as tall, 1/ranks of the text tokens: what
a rank computes, without its collectives and the layout changes around them); and lists each kernel's device
time per step in the three runs side by side.
Raw output: --out/parallel-profile.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# In this order: cuDNN's attention kernels also carry "sm90" in their names.
KINDS = {
    # symmetric_memory: the p2p exchanges' signal kernels, which wait for the peer as a collective does.
    "collective": ("nccl", "alltoall", "all_to_all", "allreduce", "all_reduce", "gloo", "symmetric_memory"),
    "attention": ("flash", "fmha", "attention", "sdpa", "cudnn"),
    "matmul": ("gemm", "matmul", "cutlass", "scaled_mm", "xmma", "nvjet", "sm90", "addmm", "mm_"),
}


# The p2p exchanges' custom operators, after which inductor may name the kernels next to them (it named
# ulysses-p2p's norm/rotary kernels so): those kernels are not attention.
P2P_OPERATORS = ("ulysses_p2p_attention", "ring_p2p_merged_attention", "ring_p2p_attention")


def kind_of(name: str) -> str:
    lowered = name.lower()
    for operator in P2P_OPERATORS:
        lowered = lowered.replace(operator, "")
    for kind, marks in KINDS.items():
        if any(mark in lowered for mark in marks):
            return kind
    return "other"


def call_kwargs(loaded: Any, size: int, steps: int, *, share: int = 1) -> dict[str, Any]:
    """A size² call; `share` > 1 gives one rank's share of it instead: the image 1/share as tall and 1/share
    of the text tokens, i.e. exactly the tokens a rank of a group of `share` holds."""
    import torch

    family = loaded.family
    kwargs: dict[str, Any] = {
        "prompt": ["a photo of a red fox in the snow"],
        "height": size // share,
        "width": size,
        "num_inference_steps": steps,
        "guidance_scale": family.default_guidance,
        "generator": [torch.Generator("cpu").manual_seed(0)],
        "output_type": "latent",
    }
    if family.max_sequence_length:
        kwargs["max_sequence_length"] = family.max_sequence_length // share
    return kwargs


def step_ms(pipe: Any, loaded: Any, args: argparse.Namespace, device: str, *, share: int = 1) -> float:
    """Median time of a denoising step, from step-end marks, over a call of --steps steps."""
    import torch

    marks: list[float] = []

    def on_step(_p: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return tensors

    pipe(**call_kwargs(loaded, args.size, args.steps, share=share), callback_on_step_end=on_step)
    gaps = sorted(b - a for a, b in itertools.pairwise(marks))
    return round(1000 * gaps[len(gaps) // 2], 2) if gaps else float("nan")


def kernel_ms(prof: Any, steps: int) -> dict[str, tuple[float, float]]:
    """Device time per step and calls per step of each kernel in a profiled call."""
    rows: dict[str, tuple[float, float]] = {}
    for event in prof.key_averages():
        device_us = float(getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0))
        if device_us <= 0 or event.key.startswith(("ProfilerStep", "cudaStream", "nccl:")):
            continue
        if getattr(event, "device_type", None) is not None and "CUDA" not in str(event.device_type):
            continue
        rows[event.key[:120]] = (device_us / 1000 / steps, event.count / steps)
    return rows


def profiled(
    pipe: Any, loaded: Any, args: argparse.Namespace, device: str, *, share: int = 1
) -> tuple[Any, float]:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        pipe(**call_kwargs(loaded, args.size, args.steps, share=share))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1000
    return prof, wall_ms


def by_kind(rows: dict[str, tuple[float, float]]) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for name, (ms, _count) in rows.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    return {k: round(v, 2) for k, v in sorted(kinds.items())}


def rank_main(rank: int, args: argparse.Namespace, port: int, out: Path) -> None:
    import torch

    from diffuserve.engine.loader import load_pipeline
    from diffuserve.engine.parallel import close_group, init_group, parallelize
    from diffuserve.engine.tiers import Tier, apply_tier
    from diffuserve.types import GroupRank

    devices = tuple(["cpu"] * args.ranks) if args.cpu else tuple(f"cuda:{i}" for i in range(args.ranks))
    device = devices[rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    init_group(GroupRank(rank, devices, port, 300.0), device)
    weights = "pretrained" if args.model_repo == "digits" else "random"
    loaded = load_pipeline(args.model_repo, device=device, dtype_name="auto", weights=weights, hf_token=None)
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    apply_tier(pipe, Tier(args.tier), device=device, cache_dir=str(out / "cache"))
    result: dict[str, Any] = {
        "ranks": args.ranks,
        "device": device,
        "model": args.model_repo,
        "tier": args.tier,
        "steps": args.steps,
        "attention": args.attention,
    }
    one: dict[str, tuple[float, float]] = {}
    share: dict[str, tuple[float, float]] = {}
    if rank == 0:
        # The same steps on this GPU alone, before the group splits the model: the baseline of this run.
        pipe(**call_kwargs(loaded, args.size, 2))
        result["one_device_step_ms"] = step_ms(pipe, loaded, args, device)
        prof, wall = profiled(pipe, loaded, args, device)
        one = kernel_ms(prof, args.steps)
        result["one_device_profiled_call_ms"] = round(wall, 1)
        # A rank's share alone: every token-wise kernel sees exactly a rank's rows, without collectives or
        # the layout changes around them. Only the attention differs: a rank does 1/ranks of the image's,
        # this call 1/ranks² (its whole sequence is 1/ranks as long).
        pipe(**call_kwargs(loaded, args.size, 2, share=args.ranks))
        result["share_step_ms"] = step_ms(pipe, loaded, args, device, share=args.ranks)
        prof, wall = profiled(pipe, loaded, args, device, share=args.ranks)
        share = kernel_ms(prof, args.steps)
        result["share_profiled_call_ms"] = round(wall, 1)
        torch._dynamo.reset()
    torch.distributed.barrier()
    parallelize(loaded, args.ranks, args.attention)
    from torch._dynamo.utils import counters

    counters.clear()
    started = time.perf_counter()
    pipe(**call_kwargs(loaded, args.size, 2))
    result["warmup_s"] = round(time.perf_counter() - started, 1)
    result["graph_breaks"] = dict(Counter({k: v for k, v in counters["graph_break"].items()}).most_common(12))
    result["group_step_ms"] = step_ms(pipe, loaded, args, device)
    prof, wall = profiled(pipe, loaded, args, device)
    if rank == 0:
        group = kernel_ms(prof, args.steps)
        result["group_profiled_call_ms"] = round(wall, 1)
        runs = {"one_device": one, "share": share, "group": group}
        result["device_ms_per_step_by_kind"] = {k: by_kind(v) for k, v in runs.items()}
        result["device_busy_ms_per_step"] = {
            k: round(sum(ms for ms, _ in v.values()), 2) for k, v in runs.items()
        }
        names = sorted(
            set(one) | set(share) | set(group),
            key=lambda n: -max(v.get(n, (0.0, 0.0))[0] for v in runs.values()),
        )
        # Per step: [kernel, kind, one-device ms, calls, share ms, calls, group ms, calls]
        result["kernels"] = [
            [name, kind_of(name)]
            + [
                round(value, 3 if index == 0 else 1)
                for times in runs.values()
                for index, value in enumerate(times.get(name, (0.0, 0.0)))
            ]
            for name in names[: args.top]
        ]
        (out / "parallel-profile.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "kernels"}, indent=1), flush=True)
    close_group()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--model-repo", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--tier", default="L")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="steps of the timed and profiled calls")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="gloo between CPU processes (a dry run)")
    parser.add_argument(
        "--attention",
        default="ring-p2p",
        help="PARALLEL_ATTENTION of the group; the default is what `auto` gives a group with CUDA graphs "
        "(this profile runs without them: a kernel's device time is the same); ring-p2p and ulysses-p2p "
        "need GPUs, so a --cpu dry run takes ulysses",
    )
    parser.add_argument(
        "--top", type=int, default=60, help="kernels listed, by the largest of the three times"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch.multiprocessing as tmp

    from diffuserve.serving.worker_group import free_port

    tmp.spawn(rank_main, args=(args, free_port(), out), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
