"""What a worker group's collectives cost and which ways of running them cut it, measured in one run.

    python benchmarks/gpu_parallel_comm.py --out $OUT        # 2 GPUs, random FLUX.1-dev, tier L, 1024²
    python benchmarks/gpu_parallel_comm.py --out /tmp/c --model-repo digits --tier E --size 32 --cpu \
        --variants ulysses,fused --nccl-envs ""

1. The collectives alone, per NCCL setting (each in a fresh pair of processes, since NCCL reads its
   environment once): all-to-all of one FLUX block's Q (7 MB each way at 1024²), of Q, K and V stacked, and
   the all-gather of K and V that ring attention does instead; on GPUs also one block's two exchanges as
   ulysses-p2p writes them into the peers' memory, against NCCL's all-to-alls of the same bytes.
2. The model, per variant (each in a fresh pair of ranks: the denoiser is split once per process):
   ulysses = diffusers' Ulysses (PARALLEL_ATTENTION=ulysses-diffusers: three all-to-alls for Q, K, V and one
   for the output); fused = the same with Q, K and V in one all-to-all (PARALLEL_ATTENTION=ulysses,
   diffuserve.engine.ulysses); ring = diffusers' ring attention (one all-gather of K and V per block);
   fused-overlap and ring-overlap = the same with inductor's compute/communication reordering
   (reorder_for_compute_comm_overlap with the passes PyTorch recommends, see cpu_comm_order.py; runs 1 to 8
   set the flag alone, which runs no pass); fused-graphs = fused with the denoiser's calls replayed as CUDA graphs
   (diffuserve.engine.graphs), which as the first variant also times one GPU alone with graphs;
   ulysses-graphs and ring-graphs = ulysses and ring with graphs; ulysses-, ring- and fused-overlap-graphs =
   the same with graphs and inductor's reordering; fused-autotune-graphs = fused-graphs with inductor's GEMM
   autotuning (max_autotune_gemm); p2p and p2p-graphs = PARALLEL_ATTENTION=ulysses-p2p (the exchanges as
   writes into the peers' memory, diffuserve.engine.ulysses_p2p) as it ships, without and with graphs;
   p2p-kernel-graphs, p2p-kernel-chunks-graphs, p2p-engine-graphs and p2p-engine-chunks-graphs = the peers'
   shares by PyTorch's copy kernels or by the copy engine, in one chunk of heads or two (run 11 ran
   p2p-graphs while the copy engine in two chunks was the default); ring-p2p-graphs = PARALLEL_ATTENTION=ring-p2p
   (K and V written into the peers' memory by copy engine while each rank attends over its own,
   diffuserve.engine.ring_p2p) with graphs, its attention by cuDNN as it ships; ring-p2p-flash-graphs = the
   same with flash attention (run 13 also put K and V on two copy streams, with the code of commit a96be77);
   ring-p2p-traced-merge-graphs = ring-p2p-graphs with the partial attentions merged in traced code (which
   inductor fuses into the next layer) instead of by the merge kernel; ring-p2p-combo-graphs = ring-p2p-graphs
   with inductor's combo kernels; ring-p2p-per-step-modulation-graphs = ring-p2p-graphs with FLUX's AdaLN
   modulation computed at each step (as before run 17) instead of from per-call tables
   (diffuserve.engine.modulation); with --one-device-each one GPU alone is timed under each variant's settings.
   For each: the median step, a whole call of --call-steps steps (latents out), graph breaks, the CPU time
   to enqueue one transformer call against the time until the GPU has run it (near equal where the CPU sets the
   pace), and from a profiled call, per step, the time some kernel computes, the time only a collective runs
   (communication not hidden) and the time no kernel runs at all (launch gaps), with the kernels launched,
   the device copies' time (copy engines run no kernel), the 40 kernels that take the most time, each
   stream's kernel time and the busiest stream's idle gaps. The first variant also times the same steps on
   rank 0's GPU alone, before the split: the one-GPU figure of the same run (unless --no-one-device; with
   --one-device-each every variant does, under its own settings), and with graphs profiles that GPU's graphed
   call too.
Raw output: --out/comm.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# The flag alone runs no reordering pass (its list of passes is empty by default): name the passes.
from cpu_comm_order import RECOMMENDED_PASSES  # noqa: E402
from diffuserve.serving.worker_group import free_port  # noqa: E402

# The profile's own pipeline call and step timing, so both scripts time the same work.
from gpu_parallel_profile import call_kwargs, step_ms  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "ulysses": {"attention": "ulysses-diffusers"},
    "fused": {"attention": "ulysses"},
    "ring": {"attention": "ring"},
    "fused-overlap": {"attention": "ulysses", "overlap": True},
    "ring-overlap": {"attention": "ring", "overlap": True},
    "fused-graphs": {"attention": "ulysses", "graphs": True},
    "ring-graphs": {"attention": "ring", "graphs": True},
    "ulysses-graphs": {"attention": "ulysses-diffusers", "graphs": True},
    "ulysses-overlap-graphs": {"attention": "ulysses-diffusers", "overlap": True, "graphs": True},
    "ring-overlap-graphs": {"attention": "ring", "overlap": True, "graphs": True},
    "fused-overlap-graphs": {"attention": "ulysses", "overlap": True, "graphs": True},
    # Inductor's GEMM choices (Triton templates against cuBLAS) benchmarked per shape at compile time, without
    # max-autotune's own CUDA graphs (the hook captures its own).
    "fused-autotune-graphs": {
        "attention": "ulysses",
        "inductor": {"max_autotune_gemm": True},
        "graphs": True,
    },
    "p2p": {"attention": "ulysses-p2p"},
    "p2p-graphs": {"attention": "ulysses-p2p", "graphs": True},
    "p2p-kernel-graphs": {"attention": "ulysses-p2p", "graphs": True, "p2p": ("kernel", 1)},
    "p2p-kernel-chunks-graphs": {"attention": "ulysses-p2p", "graphs": True, "p2p": ("kernel", 2)},
    "p2p-engine-graphs": {"attention": "ulysses-p2p", "graphs": True, "p2p": ("copy-engine", 1)},
    "p2p-engine-chunks-graphs": {"attention": "ulysses-p2p", "graphs": True, "p2p": ("copy-engine", 2)},
    "ring-p2p-graphs": {"attention": "ring-p2p", "graphs": True},
    "ring-p2p-flash-graphs": {"attention": "ring-p2p", "graphs": True, "kernel": "flash"},
    "ring-p2p-traced-merge-graphs": {"attention": "ring-p2p", "graphs": True, "merge": "traced"},
    "ring-p2p-combo-graphs": {"attention": "ring-p2p", "graphs": True, "inductor": {"combo_kernels": True}},
    "ring-p2p-per-step-modulation-graphs": {"attention": "ring-p2p", "graphs": True, "modulation": False},
}
NCCL_ENVS: dict[str, dict[str, str]] = {
    "default": {},
    "min-channels-32": {"NCCL_MIN_NCHANNELS": "32"},
    "p2p-chunk-2MiB": {"NCCL_P2P_NVL_CHUNKSIZE": str(2 << 20)},
    "p2p-copy-engine": {"NCCL_P2P_USE_CUDA_MEMCPY": "1"},
    "p2p-channels-32": {"NCCL_MIN_P2P_NCHANNELS": "32"},
    "p2p-channels-64": {"NCCL_MIN_P2P_NCHANNELS": "64", "NCCL_MAX_P2P_NCHANNELS": "64"},
}


def devices_of(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(["cpu"] * args.ranks) if args.cpu else tuple(f"cuda:{i}" for i in range(args.ranks))


def join(rank: int, args: argparse.Namespace, port: int) -> str:
    import torch

    from diffuserve.engine.parallel import init_group
    from diffuserve.types import GroupRank

    devices = devices_of(args)
    if devices[rank].startswith("cuda"):
        torch.cuda.set_device(devices[rank])
    init_group(GroupRank(rank, devices, port, 300.0), devices[rank])
    return devices[rank]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- collectives


def collectives_rank(rank: int, args: argparse.Namespace, port: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    device = join(rank, args, port)
    # One rank's share of a 1024² FLUX block: 4096 image + 512 text tokens over the ranks, 24 heads × 128.
    tokens = (args.size // 16) ** 2 + 512
    elements = tokens // args.ranks * 3072
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cases = {
        "all_to_all_q": (elements, "a2a"),
        "all_to_all_qkv": (3 * elements, "a2a"),
        "all_gather_kv": (2 * elements, "gather"),
    }
    result: dict[str, Any] = {"tokens": tokens, "mb_per_q_tensor": round(elements * 2 / 1e6, 2)}
    for name, (count, kind) in cases.items():
        src = torch.randn(count, device=device, dtype=dtype)
        dst = torch.empty(count * (args.ranks if kind == "gather" else 1), device=device, dtype=dtype)

        def once(kind: str = kind, src: Any = src, dst: Any = dst) -> None:
            if kind == "a2a":
                dist.all_to_all_single(dst, src)
            else:
                dist.all_gather_into_tensor(dst, src)

        for _ in range(5):
            once()
        sync(device)
        times = []
        for _ in range(args.collective_repeats):
            dist.barrier()
            sync(device)
            started = time.perf_counter()
            for _ in range(20):
                once()
            sync(device)
            times.append((time.perf_counter() - started) / 20 * 1e6)
        result[f"{name}_us"] = round(statistics.median(times), 1)
    if device.startswith("cuda"):
        result.update(p2p_exchange_us(args, device, tokens // args.ranks))
    if rank == 0:
        (out / "collectives.json").write_text(json.dumps(result))
    from diffuserve.engine.parallel import close_group

    close_group()


def p2p_exchange_us(args: argparse.Namespace, device: str, local_tokens: int) -> dict[str, float]:
    """ulysses-p2p's two exchanges of one block without the attention between them (Q, K and V written into
    the peers' inboxes, barrier, the output written back, barrier, copy-out), the peers' shares by PyTorch's
    copy kernels or by the copy engine, against NCCL's all-to-alls of the same bytes (Q, K and V stacked,
    then the output); each replayed from a CUDA graph of 20 blocks."""
    import torch
    import torch.distributed as dist

    from diffuserve.engine.ulysses_p2p import Exchange, copy, engine_copy, send_output, send_qkv

    heads, dim = 24, 128
    qkv = tuple(
        torch.randn(1, local_tokens, heads, dim, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    exchange = Exchange(dist.group.WORLD.group_name, torch.device(device), torch.bfloat16, qkv[0].numel())
    share = exchange.share
    local_heads = heads // share.world
    qkv_inboxes, out_inboxes = exchange.inboxes(qkv[0].shape)
    attention_out = torch.randn(
        1, local_tokens * share.world, local_heads, dim, device=device, dtype=torch.bfloat16
    )
    peers = [rank for rank in range(share.world) if rank != share.rank]
    every = slice(0, local_heads)
    stacked = torch.randn(3 * qkv[0].numel(), device=device, dtype=torch.bfloat16)
    stacked_out, single, single_out = (
        torch.empty_like(stacked),
        qkv[0].flatten(),
        torch.empty_like(qkv[0]).flatten(),
    )

    def p2p(remote: Any) -> None:
        send_qkv(share, qkv, qkv_inboxes, peers, every, remote)
        send_qkv(share, qkv, qkv_inboxes, [share.rank], every, copy)
        exchange.handle.barrier(channel=0, timeout_ms=60_000)
        send_output(share, attention_out, out_inboxes, peers, every, remote)
        send_output(share, attention_out, out_inboxes, [share.rank], every, copy)
        exchange.handle.barrier(channel=0, timeout_ms=60_000)
        out_inboxes[share.rank].clone()

    def nccl() -> None:
        dist.all_to_all_single(stacked_out, stacked)
        dist.all_to_all_single(single_out, single)

    cases = {
        "p2p_exchange_kernel_graph_us": lambda: p2p(copy),
        "p2p_exchange_engine_graph_us": lambda: p2p(engine_copy),
        "nccl_exchange_graph_us": nccl,
    }
    timed: dict[str, float] = {}
    for name, once in cases.items():
        for _ in range(3):
            once()
        sync(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                once()
        times = []
        for _ in range(args.collective_repeats):
            dist.barrier()
            sync(device)
            started = time.perf_counter()
            graph.replay()
            sync(device)
            times.append((time.perf_counter() - started) / 20 * 1e6)
        timed[name] = round(statistics.median(times), 1)
        del graph
    return timed


# ---------------------------------------------------------------------------------------------------- model


def call_ms(pipe: Any, loaded: Any, args: argparse.Namespace, device: str) -> float:
    """The lone request's denoising part: a whole call of --call-steps steps (best of two)."""
    best = float("inf")
    for _ in range(2):
        sync(device)
        started = time.perf_counter()
        pipe(**call_kwargs(loaded, args.size, args.call_steps))
        sync(device)
        best = min(best, (time.perf_counter() - started) * 1000)
    return round(best, 1)


def enqueue_vs_run(
    pipe: Any, model: Any, loaded: Any, args: argparse.Namespace, device: str, *, group: bool
) -> dict[str, float]:
    """One transformer call: how long the CPU takes to enqueue it, and how long until the GPU has run it."""
    import torch.distributed as dist

    captured: dict[str, Any] = {}

    def grab(_module: Any, margs: tuple, mkwargs: dict) -> None:
        captured.setdefault("call", (margs, mkwargs))

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(**call_kwargs(loaded, args.size, 1))
    finally:
        handle.remove()
    margs, mkwargs = captured["call"]
    enqueue, done = [], []
    for _ in range(5):
        if group:
            dist.barrier()
        sync(device)
        started = time.perf_counter()
        model(*margs, **mkwargs)
        enqueue.append((time.perf_counter() - started) * 1000)
        sync(device)
        done.append((time.perf_counter() - started) * 1000)
    return {
        "cpu_enqueue_ms": round(statistics.median(enqueue), 2),
        "until_done_ms": round(statistics.median(done), 2),
    }


def timeline(trace_path: Path, steps: int) -> dict[str, Any]:
    """From a profiler trace: per step, the time some compute kernel runs, the time only collectives run, and
    the time no kernel runs; the collectives' count and mean kernel time; the kernels launched and the device
    copies' time (copy engines: no kernel) per step; and the kernels that take the most time per step."""
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and e.get("ph") == "X"]
    if not kernels:
        return {"kernels": 0}

    def is_comm(e: dict) -> bool:
        return "nccl" in e["name"].lower()

    def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
        merged: list[list[float]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [(a, b) for a, b in merged]

    def length(spans: list[tuple[float, float]]) -> float:
        return sum(b - a for a, b in spans)

    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
    comm = [s for s, e in zip(spans, kernels, strict=True) if is_comm(e)]
    compute = [s for s, e in zip(spans, kernels, strict=True) if not is_comm(e)]
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    busy_all = length(union(spans))
    busy_compute = length(union(compute))
    per_step = 1000.0 * steps  # µs → ms per step
    comm_durations = [b - a for a, b in comm]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e["name"][:100], []).append(float(e["dur"]))
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:TOP_KERNELS]
    return {
        "gpu_span_ms_per_step": round((last - first) / per_step, 2),
        "compute_ms_per_step": round(busy_compute / per_step, 2),
        "comm_only_ms_per_step": round((busy_all - busy_compute) / per_step, 2),
        "no_kernel_ms_per_step": round((last - first - busy_all) / per_step, 2),
        "collectives_per_step": round(len(comm) / steps, 1),
        "collective_kernel_mean_us": round(statistics.mean(comm_durations), 1) if comm else None,
        "collective_kernel_median_us": round(statistics.median(comm_durations), 1) if comm else None,
        "kernels_per_step": round(len(kernels) / steps, 1),
        "copies_ms_per_step": round(sum(float(e["dur"]) for e in copies) / per_step, 2),
        "top_kernels": [
            {
                "name": name,
                "ms_per_step": round(sum(durations) / per_step, 2),
                "per_step": round(len(durations) / steps, 1),
                "mean_us": round(statistics.mean(durations), 1),
            }
            for name, durations in top
        ],
        "main_stream": stream_gaps(kernels, steps),
    }


def stream_gaps(kernels: list[dict], steps: int) -> dict[str, Any]:
    """Each stream's kernel time per step; for the stream that runs the most of it, its idle time between
    kernels per step, by the kernel that ended before it and by the kernel that started after it (what the
    stream waited on: a dependency on another stream, a peer, or a launch). Without CUDA graphs that is the
    compute stream; a graph's replay spreads its kernels over streams of its own (one per block's worth in
    the traces of run 16), so with graphs the busiest stream is the eager one around them."""
    by_stream: dict[Any, list[dict]] = {}
    for e in kernels:
        by_stream.setdefault(e.get("tid"), []).append(e)
    busy = {k: sum(float(e["dur"]) for e in v) for k, v in by_stream.items()}
    main = max(busy, key=lambda k: busy[k])
    ordered = sorted(by_stream[main], key=lambda e: float(e["ts"]))
    after: Counter[str] = Counter()
    before: Counter[str] = Counter()
    gaps: list[float] = []
    for prev, nxt in itertools.pairwise(ordered):
        gap = float(nxt["ts"]) - (float(prev["ts"]) + float(prev["dur"]))
        if gap <= 0:
            continue
        gaps.append(gap)
        after[prev["name"][:90]] += gap
        before[nxt["name"][:90]] += gap
    per_step = 1000.0 * steps

    def table(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(us / per_step, 3)] for name, us in counter.most_common(TOP_GAPS)]

    return {
        "streams_busy_ms_per_step": {str(k): round(v / per_step, 2) for k, v in busy.items()},
        "kernels_per_step": round(len(ordered) / steps, 1),
        "busy_ms_per_step": round(busy[main] / per_step, 2),
        "idle_ms_per_step": round(sum(gaps) / per_step, 2),
        "idle_gaps_over_5us_per_step": round(sum(1 for g in gaps if g > 5) / steps, 1),
        "idle_in_gaps_over_5us_ms_per_step": round(sum(g for g in gaps if g > 5) / per_step, 2),
        "idle_before": table(before),
        "idle_after": table(after),
    }


# The kernels and the idle time a profiled call's summary lists.
TOP_KERNELS = 40
TOP_GAPS = 15


def profile_call(pipe: Any, loaded: Any, args: argparse.Namespace, device: str) -> Any:
    """A profiled call of --profile-steps steps, kernels only on a GPU (CPU events would swell the trace and
    slow the profiled call further)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        pipe(**call_kwargs(loaded, args.size, args.profile_steps))
        sync(device)
    return prof


def summarise_trace(prof: Any, args: argparse.Namespace, out: Path, name: str) -> dict[str, Any]:
    trace = out / f"trace-{name}.json"
    prof.export_chrome_trace(str(trace))
    # The profiled call has 1 more transformer call's worth of set-up; per step is close enough.
    summary = timeline(trace, args.profile_steps)
    if args.keep_traces:
        subprocess.run(["gzip", "-f", str(trace)], check=False)
    else:
        trace.unlink()
    return summary


def variant_rank(rank: int, args: argparse.Namespace, port: int, out: Path, name: str) -> None:
    from dataclasses import replace

    import torch
    from diffusers.hooks import HookRegistry

    from diffuserve.engine.graphs import HOOK_NAME, enable_cuda_graphs
    from diffuserve.engine.loader import load_pipeline
    from diffuserve.engine.modulation import ATTRIBUTE as MODULATION
    from diffuserve.engine.parallel import close_group, parallelize
    from diffuserve.engine.tiers import apply_recipe, denoiser_of, recipe_for

    options = VARIANTS[name]
    device = join(rank, args, port)
    if options.get("overlap"):
        import torch._inductor.config as inductor_config

        inductor_config.reorder_for_compute_comm_overlap = True
        inductor_config.reorder_for_compute_comm_overlap_passes = RECOMMENDED_PASSES
    if options.get("inductor"):
        import torch._inductor.config as inductor_config

        for key, value in options["inductor"].items():
            setattr(inductor_config, key, value)
    weights = "pretrained" if args.model_repo == "digits" else "random"
    loaded = load_pipeline(args.model_repo, device=device, dtype_name="auto", weights=weights, hf_token=None)
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    recipe = replace(recipe_for(args.tier), step_modulation=options.get("modulation", True))
    apply_recipe(pipe, recipe, device=device, cache_dir=args.cache_dir)
    model = denoiser_of(pipe)
    result: dict[str, Any] = {"variant": name, "ranks": args.ranks, "device": device, "tier": args.tier}
    if options.get("overlap"):
        import torch._inductor.config as inductor_config

        result["inductor_passes"] = list(inductor_config.reorder_for_compute_comm_overlap_passes)
    if rank == 0 and args.one_device:
        pipe(**call_kwargs(loaded, args.size, 2))
        result["one_device_step_ms"] = step_ms(pipe, loaded, args, device)
        result["one_device_call_ms"] = call_ms(pipe, loaded, args, device)
        result["one_device_enqueue"] = enqueue_vs_run(pipe, model, loaded, args, device, group=False)
        if options.get("graphs"):
            hook = enable_cuda_graphs(model)
            pipe(**call_kwargs(loaded, args.size, 2))
            result["one_device_graphs_step_ms"] = step_ms(pipe, loaded, args, device)
            result["one_device_graphs_call_ms"] = call_ms(pipe, loaded, args, device)
            result["one_device_graphs_enqueue"] = enqueue_vs_run(
                pipe, model, loaded, args, device, group=False
            )
            result["one_device_graphs_replays"] = hook.replays
            result["one_device_graphs_profiled"] = summarise_trace(
                profile_call(pipe, loaded, args, device), args, out, f"{name}-one-device"
            )
            # The group's graphs must hold its collectives: the hook goes back on after the split.
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK_NAME, recurse=False)
            del hook
        torch._dynamo.reset()
    torch.distributed.barrier()
    if options["attention"] == "ulysses-p2p":
        from diffuserve.engine import ulysses_p2p

        ulysses_p2p.TRANSPORT, ulysses_p2p.CHUNKS = options.get(
            "p2p", (ulysses_p2p.TRANSPORT, ulysses_p2p.CHUNKS)
        )
        result["p2p"] = {"transport": ulysses_p2p.TRANSPORT, "chunks": ulysses_p2p.CHUNKS}
    if options["attention"] == "ring-p2p":
        from diffuserve.engine import ring_p2p

        ring_p2p.KERNEL = options.get("kernel", ring_p2p.KERNEL)
        ring_p2p.MERGE = options.get("merge", ring_p2p.MERGE)
        result["ring_p2p"] = {"kernel": ring_p2p.KERNEL, "merge": ring_p2p.MERGE}
    parallelize(loaded, args.ranks, options["attention"], timeout_s=60.0)
    group_hook = enable_cuda_graphs(model) if options.get("graphs") else None
    from torch._dynamo.utils import counters

    counters.clear()
    started = time.perf_counter()
    pipe(**call_kwargs(loaded, args.size, 2))
    result["warmup_s"] = round(time.perf_counter() - started, 1)
    result["graph_breaks"] = dict(Counter(dict(counters["graph_break"])).most_common(12))
    result["group_step_ms"] = step_ms(pipe, loaded, args, device)
    result["group_call_ms"] = call_ms(pipe, loaded, args, device)
    result["group_enqueue"] = enqueue_vs_run(pipe, model, loaded, args, device, group=True)
    tables = getattr(model, MODULATION, None)
    if tables is not None:
        result["modulation"] = {"lookups": tables.lookups, "computed": tables.computed}
    if group_hook is not None:
        result["group_graph_replays"] = group_hook.replays
        result["group_graphs_disabled"] = group_hook.disabled
    prof = profile_call(pipe, loaded, args, device)
    if rank == 0:
        result["profiled"] = summarise_trace(prof, args, out, name)
        (out / f"variant-{name}.json").write_text(json.dumps(result))
    if group_hook is not None:
        group_hook.release()  # NCCL's teardown hangs while a graph holds its collectives
    close_group()


# ----------------------------------------------------------------------------------------------------- main


def child(
    args: argparse.Namespace, what: str, extra_env: dict[str, str], extra_args: list[str]
) -> dict[str, Any]:
    """Run one measurement in a fresh pair of processes; its JSON, or what went wrong."""
    out = Path(args.out)
    command = [sys.executable, __file__, *sys.argv[1:], *extra_args, "--child", what]
    env = {**os.environ, **extra_env}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, timeout=args.child_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.child_timeout} s"}
    wall = round(time.perf_counter() - started, 1)
    if args.keep_traces:  # with the traces, what the child printed (compile warnings, inductor's logs)
        (out / f"stderr-{what}.log").write_text(done.stderr[-1_000_000:])
    path = out / ("collectives.json" if what == "collectives" else f"variant-{what}.json")
    if done.returncode != 0 or not path.exists():
        return {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-3000:], "wall_s": wall}
    result = dict(json.loads(path.read_text()))
    path.unlink()
    result["wall_s"] = wall
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--model-repo", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--tier", default="L")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="steps of the step-time call")
    parser.add_argument("--call-steps", type=int, default=28, help="steps of the whole-call timing")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="gloo between CPU processes (a dry run)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--nccl-envs", default=",".join(NCCL_ENVS), help="'' for none")
    parser.add_argument("--collective-repeats", type=int, default=7)
    parser.add_argument("--child-timeout", type=float, default=200)
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(tempfile.gettempdir(), "diffuserve-comm-cache"),
        help="compile cache shared by the variants (kernels they have in common compile once)",
    )
    parser.add_argument("--one-device", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--one-device-each",
        action="store_true",
        help="time one GPU alone in every variant (for variants whose settings change one GPU's kernels too)",
    )
    parser.add_argument(
        "--keep-traces",
        action="store_true",
        help="keep rank 0's profiler trace and the stderr of each variant in --out",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch.multiprocessing as tmp

    if args.child == "collectives":
        tmp.spawn(collectives_rank, args=(args, free_port(), out), nprocs=args.ranks, join=True)
        return 0
    if args.child:
        tmp.spawn(variant_rank, args=(args, free_port(), out, args.child), nprocs=args.ranks, join=True)
        return 0

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_serving import environment, log

    results: dict[str, Any] = {"args": vars(args), "env": environment(), "collectives": {}, "variants": {}}

    def save() -> None:
        (out / "comm.json").write_text(json.dumps(results, indent=1))

    collectives = results["collectives"]
    for env_name in [n for n in args.nccl_envs.split(",") if n]:
        collectives[env_name] = {
            "env": NCCL_ENVS[env_name],
            **child(args, "collectives", NCCL_ENVS[env_name], []),
        }
        log(f"collectives, {env_name}: {collectives[env_name]}")
        save()
    runs: list[tuple[str, str, dict[str, str]]] = [(n, n, {}) for n in args.variants.split(",") if n]
    timed = {k: v["all_to_all_qkv_us"] for k, v in collectives.items() if "all_to_all_qkv_us" in v}
    if "default" in timed and runs:
        best = min(timed, key=lambda k: timed[k])
        if timed[best] < 0.85 * timed["default"]:
            # A setting that makes the exchange clearly faster alone: does it show in the model (the first
            # variant again, with it)?
            first = runs[0][1]
            runs.append((f"{first}+{best}", first, NCCL_ENVS[best]))
    for index, (label, name, env) in enumerate(runs):
        alone = index == 0 or args.one_device_each
        results["variants"][label] = child(args, name, env, [] if alone else ["--no-one-device"])
        log(f"variant {label}: {json.dumps(results['variants'][label])}")
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
