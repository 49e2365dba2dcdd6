"""Adapters per request on the GPU: what an adapter costs a lone request, what a swap costs, whether swapping
recompiles anything, and 8 users with 4 adapters served in split batches against mixed ones, next to 8 users
with none. The engine as a worker runs it (tier recipe, CUDA graphs, warm-up) on a random-weight real
architecture, with random adapters of several ranks on every adaptable layer; the load comes from the
server's own Scheduler in this process (its batching rules, no HTTP).

    python benchmarks/gpu_lora.py --model flux-dev --tiers XL --baseline --out $OUT   # ≈ 5 min on an H100
    python benchmarks/gpu_lora.py --model flux-dev --tiers "" --hotswap --out $OUT    # diffusers hotswap alone
    python benchmarks/gpu_lora.py --model digits --device cpu --tiers E --size 32 --ranks 4,8,16,2 --out /tmp/l

Output (--out, else $OUT): lora-<model>.jsonl, one row per tier.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from common import environment, log, median, out_dir
from diffuserve.engine.config import DType, EngineConfig, Weights
from diffuserve.models.random_weights import RELEASED_REPOS
from diffuserve.types import BatchItem, BatchJob, EncodedImage, GenerationRequest, LoraUse, Tier

PROMPT = "a photo of a red fox in the snow"
REPOS = {**RELEASED_REPOS, "digits": "digits"}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compile_counts(engine: Any) -> dict[str, int]:
    """Graphs dynamo compiled so far, and CUDA graphs captured: a recompile or a re-capture raises one."""
    from torch._dynamo.utils import counters

    graphs = engine._graphs
    return {
        "dynamo_graphs": int(counters["stats"]["unique_graphs"]),
        "cuda_graphs": len(graphs.graphs) if graphs is not None else 0,
    }


def job_of(items: list[tuple[int, tuple[LoraUse, ...]]], size: int, steps: int, guidance: float) -> BatchJob:
    batch = [BatchItem(f"r{seed}", PROMPT, None, [seed], "jpeg", None, loras=loras) for seed, loras in items]
    return BatchJob(1, size, size, steps, guidance, batch)


def timed(engine: Any, job: BatchJob) -> float:
    sync()
    started = time.perf_counter()
    result = engine.compute(job)
    sync()
    if not hasattr(result, "pixels"):
        raise RuntimeError(f"batch failed: {result.error}")
    return time.perf_counter() - started


def swap_costs(engine: Any, uses: list[LoraUse], size: int, steps: int, guidance: float) -> list[float]:
    """Slot writes alone: each call asks for a set no slot holds (a new scale), from adapters in the cache."""
    costs = []
    for i in range(12):
        use = uses[i % len(uses)]
        fresh = LoraUse(use.name, use.path, 0.5 + i / 100)
        job = job_of([(i, (fresh,))], size, steps, guidance)
        sync()
        report = engine.adapters.prepare(job)
        sync()
        assert report.slots_written == 1 and not report.loaded
        costs.append(report.seconds * 1000)
    return costs


async def closed_loop(
    engine: Any,
    info: Any,
    users: list[tuple[LoraUse, ...]],
    per_user: int,
    split: bool,
    size: int,
    steps: int,
) -> dict[str, Any]:
    """`users` each send `per_user` requests one after another through the server's Scheduler; one worker
    (this engine) runs its batches in a thread."""
    from diffuserve.messages import BatchResult
    from diffuserve.serving.scheduler import Scheduler

    scheduler = Scheduler(max_batch=info.max_batch, max_queue=64, split_adapters=split)
    loop = asyncio.get_running_loop()
    sizes: list[int] = []

    class Worker:
        worker_id = 0

        def send(self, job: BatchJob) -> None:
            sizes.append(job.num_images)
            threading.Thread(target=self.run, args=(job,), daemon=True).start()

        def run(self, job: BatchJob) -> None:
            engine.compute(job)
            sync()
            images = [[EncodedImage(b"", seed, "image/jpeg") for seed in item.seeds] for item in job.items]
            loop.call_soon_threadsafe(scheduler.batch_finished, self, BatchResult(job.batch_id, images))

    async def user(index: int, loras: tuple[LoraUse, ...]) -> list[float]:
        latencies = []
        for i in range(per_user):
            request = GenerationRequest(
                f"u{index}-{i}", info.name, PROMPT, 1, size, size, steps, info.default_guidance,
                1000 * index + i, "jpeg", loras=loras,
            )  # fmt: skip
            sent = time.perf_counter()
            await scheduler.submit(request).future
            latencies.append(time.perf_counter() - sent)
        return latencies

    scheduler.worker_idle(Worker())
    started = time.perf_counter()
    results = await asyncio.gather(*(user(i, loras) for i, loras in enumerate(users)))
    elapsed = time.perf_counter() - started
    latencies = sorted(latency for per in results for latency in per)
    return {
        "images": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(len(latencies) / elapsed, 3),
        "p50_s": round(median(latencies), 3),
        "batch_sizes": {str(n): sizes.count(n) for n in sorted(set(sizes))},
    }


def started_engine(
    args: argparse.Namespace, tier: str, max_rank: int, row: dict[str, Any], warm: bool = True
) -> tuple[Any, Any]:
    from diffuserve.engine.engine import Engine

    config = EngineConfig(
        model_repo=REPOS[args.model], model_name=args.model, tier=Tier.parse(tier), max_batch=4,
        weights=Weights.PRETRAINED if args.model == "digits" else Weights.RANDOM,
        dtype=DType.AUTO if args.device == "cpu" else DType.BFLOAT16, cache_dir=args.cache_dir, lora_max_rank=max_rank,
    )  # fmt: skip
    engine = Engine(config, args.device)
    started = time.perf_counter()
    info = engine.load()
    row["load_s"] = round(time.perf_counter() - started, 2)
    if not warm:
        return engine, info
    started = time.perf_counter()
    engine.warmup()
    row["warmup_s"] = round(time.perf_counter() - started, 2)
    row["compile_counts"] = {"after_warmup": compile_counts(engine)}
    return engine, info


def measure_without(args: argparse.Namespace, tier: str) -> dict[str, Any]:
    """The baseline in the same run: the same tier with adapters off (no slots in any layer)."""
    row: dict[str, Any] = {"model": args.model, "tier": tier, "size": args.size, "steps": args.steps}
    row["adapters"] = "off"
    engine, info = started_engine(args, tier, 0, row)
    guidance, size, steps = info.default_guidance, args.size, args.steps
    plain = [timed(engine, job_of([(i, ())], size, steps, guidance)) for i in range(args.repeats)]
    row["lone_s"] = {"no_adapter": median(plain)}
    users = [() for _ in range(args.users)]
    row["closed_loop"] = {
        "no_adapter": asyncio.run(closed_loop(engine, info, users, args.per_user, False, size, steps))
    }
    log(f"{tier} adapters off: {json.dumps(row)}")
    engine.close()
    return row


def measure_hotswap(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The peer's way, in the same run: plain diffusers, its regional compile, one adapter for the whole model
    swapped in place by `load_lora_weights(hotswap=True)` after `enable_lora_hotswap(target_rank=…)`; every
    request of another adapter waits for a swap, and a batch holds one adapter."""
    from torch._dynamo.utils import counters

    from diffuserve.engine.lora.random_adapters import save_random_adapter
    from diffuserve.engine.lora.targets import lora_targets

    row: dict[str, Any] = {"model": args.model, "tier": "diffusers-hotswap", "size": args.size}
    row["steps"] = args.steps
    engine, info = started_engine(args, "E", 0, row, warm=False)
    pipe = engine.pipeline
    targets = lora_targets(pipe.transformer)
    uses = [
        save_random_adapter(folder / f"hot{rank}.safetensors", targets, rank=rank, seed=i, std=0.01)
        for i, rank in enumerate(args.ranks)
    ]
    generator = torch.Generator(args.device).manual_seed(0)

    def run() -> float:
        sync()
        started = time.perf_counter()
        pipe(
            PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
            guidance_scale=info.default_guidance, generator=generator, output_type="pil",
        )  # fmt: skip
        sync()
        return time.perf_counter() - started

    pipe.transformer.compile_repeated_blocks(dynamic=False)
    started = time.perf_counter()
    run()
    row["compile_s"] = round(time.perf_counter() - started, 2)
    row["lone_s"] = {"no_adapter": median([run() for _ in range(args.repeats)])}
    pipe.enable_lora_hotswap(target_rank=args.max_rank, check_compiled="ignore")
    started = time.perf_counter()
    pipe.load_lora_weights(str(uses[0]), adapter_name="served")
    row["first_load_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    run()
    row["recompile_after_first_adapter_s"] = round(time.perf_counter() - started, 2)
    graphs = int(counters["stats"]["unique_graphs"])
    row["lone_s"]["same_adapter"] = median([run() for _ in range(args.repeats)])
    swaps, swapping = [], []
    for i in range(2 * args.repeats):
        sync()
        started = time.perf_counter()
        pipe.load_lora_weights(str(uses[(i + 1) % len(uses)]), adapter_name="served", hotswap=True)
        sync()
        swaps.append(round(time.perf_counter() - started, 3))
        swapping.append(run())
    row["lone_s"]["swapping"] = median(swapping)
    row["swap_s"] = swaps
    row["recompiles"] = int(counters["stats"]["unique_graphs"]) - graphs
    log(f"diffusers hotswap: {json.dumps(row)}")
    engine.close()
    return row


def measure(args: argparse.Namespace, tier: str, folder: Path) -> dict[str, Any]:
    from diffuserve.engine.lora.random_adapters import save_random_adapter

    row: dict[str, Any] = {"model": args.model, "tier": tier, "size": args.size, "steps": args.steps}
    row["adapters"] = "on"
    engine, info = started_engine(args, tier, args.max_rank, row)
    row["adapter_slots_mib"] = round(engine.adapters.slots.nbytes / 2**20)
    uses = []
    for i, rank in enumerate(args.ranks):
        path = save_random_adapter(
            folder / f"r{rank}.safetensors", info.lora_targets, rank=rank, seed=i, std=0.01
        )
        uses.append(LoraUse(f"rank{rank}", str(path), 1.0))
    row["adapter_mib"] = {use.name: round(Path(use.path).stat().st_size / 2**20, 1) for use in uses}
    guidance, size, steps = info.default_guidance, args.size, args.steps
    before = compile_counts(engine)
    # First use of each adapter: read from its file into the cache, then a slot written.
    row["first_use_s"] = {
        use.name: round(timed(engine, job_of([(0, (use,))], size, steps, guidance)), 3) for use in uses
    }
    plain = [timed(engine, job_of([(i, ())], size, steps, guidance)) for i in range(args.repeats)]
    same = [timed(engine, job_of([(i, (uses[0],))], size, steps, guidance)) for i in range(args.repeats)]
    # Every request a different adapter than the one before (each already in a slot after its first use).
    swapping = [
        timed(engine, job_of([(i, (uses[i % len(uses)],))], size, steps, guidance))
        for i in range(2 * args.repeats)
    ]
    row["lone_s"] = {"no_adapter": median(plain), "same_adapter": median(same), "swapping": median(swapping)}
    row["lone_ratio"] = round(median(swapping) / median(plain), 4)
    row["swap_ms"] = swap_costs(engine, uses, size, steps, guidance)
    after = compile_counts(engine)
    row["compile_counts"].update(before_adapters=before, after_adapters=after)
    row["recompiles"] = after["dynamo_graphs"] - before["dynamo_graphs"]
    row["recaptures"] = after["cuda_graphs"] - before["cuda_graphs"]
    log(f"{tier}: {json.dumps(row)}")
    users = [(uses[i % 4],) for i in range(args.users)]
    loads = {
        "no_adapter": ([() for _ in range(args.users)], False),
        "split": (users, True),
        "mixed": (users, False),
    }
    row["closed_loop"] = {}
    for name, (wanted, split) in loads.items():
        summary = asyncio.run(closed_loop(engine, info, wanted, args.per_user, split, size, steps))
        row["closed_loop"][name] = summary
        log(f"{tier} {name}: {json.dumps(summary)}")
    row["compile_counts"]["after_load"] = compile_counts(engine)
    engine.close()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="flux-dev", choices=list(REPOS))
    parser.add_argument("--device", default="cuda:0", help="cpu: a dry run of the script (digits)")
    parser.add_argument("--tiers", default="XL,L")
    parser.add_argument(
        "--ranks", default="16,32,64,8", help="the adapters' ranks; the first 4 serve the load"
    )
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--per-user", type=int, default=3)
    parser.add_argument(
        "--baseline", action="store_true", help="each tier also with adapters off, measured first"
    )
    parser.add_argument(
        "--hotswap", action="store_true", help="diffusers' compiled hotswap as well, measured first"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache-dir", default="/tmp/diffuserve-bench-cache")
    args = parser.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    out = out_dir(args.out)
    env = environment()
    with tempfile.TemporaryDirectory() as folder:
        runs: list[tuple[str, Callable[[], dict[str, Any]], dict[str, Any]]] = []
        if args.hotswap:
            runs.append(
                ("hotswap", lambda: measure_hotswap(args, Path(folder)), {"tier": "diffusers-hotswap"})
            )
        for tier in [tier for tier in args.tiers.split(",") if tier]:
            if args.baseline:
                runs.append(
                    (
                        f"{tier} adapters off",
                        partial(measure_without, args, tier),
                        {"tier": tier, "adapters": "off"},
                    )
                )
            runs.append((tier, partial(measure, args, tier, Path(folder)), {"tier": tier, "adapters": "on"}))
        for name, run, identity in runs:
            try:
                row = run()
            except Exception as exc:  # one run failing must not lose the others' numbers
                row = {"model": args.model, **identity, "error": f"{type(exc).__name__}: {exc}"}
                log(f"{name} failed: {row['error']}")
            row["environment"] = env
            with (out / f"lora-{args.model}.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
