"""The acceleration tiers as the server runs them (the engine's own set-up: recipe, CUDA graphs) against plain
diffusers eager (tier E), on the random-weight real architecture of any served family; then one lone request
per tier through `diffuserve serve`; or one profiled call per tier; or each tier's quality on the trained digits
model.

    python benchmarks/gpu_tiers.py --model flux-dev --tiers E,XL,L --batches 1 --repeats 3   # pipeline calls
    python benchmarks/gpu_tiers.py --models all --tiers family --steps 4 --repeats 1          # every family, ≈ 9 min
    python benchmarks/gpu_tiers.py --model flux-dev --phase server --tiers L                 # over HTTP
    python benchmarks/gpu_tiers.py --model digits                                            # quality per tier
    python benchmarks/gpu_tiers.py --model flux-dev --tiers E,torchao,cache-dit              # against the peers
    python benchmarks/gpu_tiers.py --model flux-dev --phase profile --tiers E,XL,L           # where time goes

`--tiers family` runs E, XL and L where the family has L. Each row records the components' parameter counts,
ms/step (median between step ends) and s/image, and after tier E its first image's PSNR against E's (the same
prompt and seed); `--budget-s` stops starting new models once spent, so a run of every family ends inside one
device call (the rows written so far are kept).

Peers (peers.py) are other projects' published recipes applied to tier E's plain diffusers pipeline, timed the
same way: `torchao` (diffusers + torchao fp8 + max-autotune compile, flux-fast's recipe) and `cache-dit` (its
DBCache and compile). A peer whose library does not import gives a row with "error" and the run goes on.

A tier may name a setting after a slash, `L/CUDA_GRAPHS=off`, to measure what a technique gives. Random weights
have the released models' architectures, so time and memory are the real models'; their images are noise.

`--phase profile` sets each tier (or peer) up and warms it up as the pipeline phase does, times one plain call,
then runs one call under torch.profiler (CPU and CUDA activity, no shapes or stacks) with a marker kernel at each
step end; step_profile.py sorts the GPU kernels into matmul, attention, norm/elementwise and memcpy/memset, and
measures busy time and the gaps between kernels, for the whole call and for the denoising steps alone. `--trace`
also writes each profiled call's chrome trace, gzip-compressed (tens to hundreds of MB each).

Output (--out, else $OUT): tiers-<model>.jsonl, server-<model>.jsonl, profile-<model>.jsonl (with --trace,
profile-<model>-<tier>-b<batch>.json.gz), digits-quality.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import peers
import step_profile
from common import ROOT, environment, log, out_dir, write_json
from diffuserve.engine.config import CudaGraphs, DType, EngineConfig, Fp8Rounding, Weights
from diffuserve.models.random_weights import RELEASED_REPOS
from diffuserve.types import Tier

MODELS = RELEASED_REPOS
PROMPTS = ["a photo of a red fox in the snow", "an astronaut riding a horse on the moon", "a bowl of ramen"]


def config_for(variant: str, repo: str, weights: Weights, max_batch: int, cache_dir: str) -> EngineConfig:
    """`L`, `L/CUDA_GRAPHS=off` or `L/FP8_ROUNDING=calibrated`: the tier and any setting the server would read."""
    tier, _, setting = variant.partition("/")
    config = EngineConfig(
        model_repo=repo, model_name=repo, tier=Tier.parse(tier), max_batch=max_batch, weights=weights,
        dtype=DType.BFLOAT16, cache_dir=cache_dir, warmup=False,
    )  # fmt: skip
    if setting == "CUDA_GRAPHS=off":
        config = replace(config, cuda_graphs=CudaGraphs.OFF)
    elif setting == "FP8_ROUNDING=calibrated":
        config = replace(config, fp8_rounding=Fp8Rounding.CALIBRATED)
    elif setting:
        raise SystemExit(f"unknown setting {setting!r} (known: CUDA_GRAPHS=off, FP8_ROUNDING=calibrated)")
    return config


def call_kwargs(engine: Any, batch: int, steps: int, size: int) -> dict[str, Any]:
    """The family's call as the engine makes it (guidance argument, true CFG's negative prompt, text length),
    at the family's default guidance; one CPU generator per image."""
    from diffuserve.engine.calls import pipeline_kwargs
    from diffuserve.types import BatchItem, BatchJob, Task

    family = engine.loaded.family
    items = [BatchItem("b", PROMPTS[i % len(PROMPTS)], None, [1000 + i], "png", None) for i in range(batch)]
    job = BatchJob(0, size, size, steps, family.default_guidance, items)
    return pipeline_kwargs(job, family, engine._accepted_by[Task.GENERATE], "pt")


def timed_call(pipe: Any, kwargs: dict[str, Any], outputs: list[Any] | None = None) -> dict[str, float]:
    """Wall time of the call, the median step between step-end events, the time to the first step's end (text
    encoders and the first step) and after the last (VAE decode), and peak memory. The call's output is appended
    to `outputs` where given."""
    events: list[Any] = []

    def on_step(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)
        return tensors

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    wall = time.perf_counter()
    start.record()
    output = pipe(**kwargs, callback_on_step_end=on_step)
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    if outputs is not None:
        outputs.append(output)
    steps = sorted(a.elapsed_time(b) for a, b in itertools.pairwise(events))
    return {
        "s": wall,
        "ms_per_step": steps[len(steps) // 2] if steps else float("nan"),
        "first_step_ms": start.elapsed_time(events[0]),
        "decode_ms": events[-1].elapsed_time(end),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


# Tier E's first image per (model, batch size), kept by E's row for the rows after it to compare with.
Eager = dict[tuple[str, int], torch.Tensor]


@contextlib.contextmanager
def warmed_up(
    args: argparse.Namespace, model: str, variant: str
) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """One tier or peer of one model loaded (a peer: its recipe on tier E's pipeline) and warmed up for every
    batch size as the server does: (engine, pipeline, the row so far). The pipeline and profile phases share it,
    so both measure the same set-up. A peer's recipe is undone on the way out; the engine is left to the caller."""
    from diffuserve.engine.engine import Engine
    from diffuserve.models.random_weights import count_params
    from diffuserve.types import Task

    peer = peers.peer_for(variant) if peers.is_peer(variant) else None
    row: dict[str, Any] = {
        "model": model,
        "tier": variant,
        **peers.describe(variant),
        "size": args.size,
        "runs": [],
    }
    why = peers.unavailable(peer) if peer is not None else None
    if why:
        raise RuntimeError(why)  # before loading tens of GB of weights
    started = time.perf_counter()
    # A peer starts from the pipeline as plain diffusers runs it: tier E's.
    config = config_for(
        "E" if peer else variant, MODELS[model], Weights.RANDOM, max(args.batches), args.cache_dir
    )
    engine = Engine(config, "cuda:0")
    info = engine.load()
    row["load_s"] = time.perf_counter() - started
    row["family"], row["steps"] = info.family, args.steps or info.default_steps
    pipe = engine._pipelines[Task.GENERATE]
    with contextlib.ExitStack() as stack:
        if peer is not None:
            # Undone on the way out, with the process-wide compile settings it changed.
            started = time.perf_counter()
            row["peer_notes"] = stack.enter_context(peers.applied(peer, pipe))
            row["peer_setup_s"] = time.perf_counter() - started
        # As loaded by this tier (fp8 and fused QKV change what is stored; tier E's are the released counts).
        row["params"] = {
            name: count_params(part)
            for name, part in pipe.components.items()
            if isinstance(part, torch.nn.Module)
        }
        for batch in sorted(args.batches, reverse=True):
            # The server's warm-up: one short call (E), or two (the first compiles, the second captures graphs);
            # a peer's own (peers.py).
            calls, steps = (1 if variant.startswith("E") else 2), 1
            if peer is not None:
                calls, steps = peer.warmup_calls, peer.warmup_steps or row["steps"]
            started = time.perf_counter()
            for _ in range(calls):
                pipe(**call_kwargs(engine, batch, steps, args.size))
            torch.cuda.synchronize()
            row[f"warmup_b{batch}_s"] = time.perf_counter() - started
        yield engine, pipe, row


def measure(args: argparse.Namespace, model: str, variant: str, eager: Eager) -> dict[str, Any]:
    """One tier or peer of one model: load, (a peer: its recipe on tier E's pipeline), warm up, time."""
    first: torch.Tensor | None = None
    with warmed_up(args, model, variant) as (engine, pipe, row):
        for batch in args.batches:
            for _ in range(args.repeats):
                outputs: list[Any] = []
                timed = timed_call(pipe, call_kwargs(engine, batch, row["steps"], args.size), outputs)
                run = {"batch": batch, **timed, "s_per_image": timed["s"] / batch}
                if first is None:
                    first = first_image(outputs[0])
                row["runs"].append(run)
                log(f"{model} {variant}: {json.dumps(run)}")
        if peers.is_peer(variant):
            try:
                row.update(peers.peer_for(variant).stats(pipe))
            except Exception as exc:  # statistics are extra: never lose the timings for them
                row["stats_error"] = f"{type(exc).__name__}: {exc}"
    compare_with_eager(row, variant, first, eager, (model, args.batches[0]))
    graphs = engine._graphs
    row["graph_replays"] = graphs.replays if graphs is not None else 0
    engine.close()
    return row


def first_image(output: Any) -> torch.Tensor | None:
    """The call's first image as float32 on the CPU (a copy: compiled graphs may reuse the output's memory)."""
    images = getattr(output, "images", None)
    if not isinstance(images, torch.Tensor):
        return None
    return images[0].detach().float().cpu()


def compare_with_eager(
    row: dict[str, Any], variant: str, image: torch.Tensor | None, eager: Eager, key: tuple[str, int]
) -> None:
    """Tier E keeps its first image; a later row of the same model and batch size records its PSNR against it."""
    if image is None:
        return
    if variant == "E":
        eager[key] = image
    elif key in eager and eager[key].shape == image.shape:
        psnr = peers.psnr_db(image, eager[key])
        # null: the same image (infinite PSNR, which JSON cannot write); a text where the image is not finite.
        if psnr == math.inf:
            row["psnr_vs_eager_db"] = None
        else:
            row["psnr_vs_eager_db"] = psnr if math.isfinite(psnr) else "not finite"


def free_gpu() -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def tiers_of(model: str, wanted: list[str]) -> list[str]:
    """The tiers (and peers) asked for, `family` standing for E, XL, and L where the family has it."""
    from diffuserve.engine.loader import detect_family
    from diffuserve.models.random_weights import arch_for_repo
    from diffuserve.types import FAMILIES

    if "family" not in wanted:
        return wanted
    family = FAMILIES.get(arch_for_repo(MODELS[model])) or detect_family("", MODELS[model])
    own = [tier for tier in ("E", "XL", "L") if tier in family.tiers]
    return [tier for name in wanted for tier in (own if name == "family" else [name])]


def tier_runs(args: argparse.Namespace, output: str) -> Iterator[tuple[str, str, Path]]:
    """(model, tier, its raw file `output-<model>.jsonl`) for each tier of each model while --budget-s lasts,
    the GPU freed before each."""
    started = time.perf_counter()
    for model in args.models:
        path = args.out / f"{output}-{model}.jsonl"
        for variant in tiers_of(model, args.tiers):
            if time.perf_counter() - started > args.budget_s:
                log(f"budget of {args.budget_s:.0f} s spent: {model} {variant} not run")
                continue
            free_gpu()
            yield model, variant, path


def run_pipelines(args: argparse.Namespace) -> None:
    eager: Eager = {}
    for model, variant, path in tier_runs(args, "tiers"):
        try:
            row = measure(args, model, variant, eager)
        except Exception as exc:  # one tier failing must not lose the others' numbers
            error = f"{type(exc).__name__}: {exc}"
            row = {"model": model, "tier": variant, **peers.describe(variant), "error": error}
            log(f"{model} {variant} failed: {row['error']}")
        append_row(path, row, args.environment)


def profiled_call(
    pipe: Any, kwargs: dict[str, Any], trace: Path | None
) -> tuple[list[step_profile.Kernel], float]:
    """One call under torch.profiler, CPU and CUDA activity, without shapes, stacks or memory (the least overhead),
    with a marker kernel at each step end: the device work it recorded and the call's wall ms. Writes the chrome
    trace to `trace` (gzip-compressed: the name ends in .gz) where given."""
    from torch.profiler import ProfilerActivity, profile

    def on_step(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        # A one-cycle spin_kernel (step_profile.STEP_MARKER): its end is this step's end on the GPU's clock.
        torch.cuda._sleep(1)
        return tensors

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False) as prof:
        started = time.perf_counter()
        pipe(**kwargs, callback_on_step_end=on_step)
        torch.cuda.synchronize()
        call_ms = (time.perf_counter() - started) * 1000
    kernels = step_profile.kernels_from_profiler(prof)
    if trace is not None:
        started = time.perf_counter()
        prof.export_chrome_trace(str(trace))
        log(f"wrote {trace} ({trace.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - started:.0f} s)")
    return kernels, call_ms


def profile_rows(args: argparse.Namespace, model: str, variant: str) -> Iterator[dict[str, Any]]:
    """Per batch size, after the pipeline phase's set-up and warm-up: one plain timed call (the reference without
    the profiler's overhead), then one profiled call, summarised by step_profile."""
    with warmed_up(args, model, variant) as (engine, pipe, row):
        del row["runs"]
        for batch in args.batches:
            steps = row["steps"]
            unprofiled = timed_call(pipe, call_kwargs(engine, batch, steps, args.size))
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"profile-{model}-{variant}-b{batch}") + ".json.gz"
            trace = args.out / name if args.trace else None
            replays = engine._graphs.replays if engine._graphs is not None else 0
            kernels, call_ms = profiled_call(pipe, call_kwargs(engine, batch, steps, args.size), trace)
            out: dict[str, Any] = {
                **row,
                "batch": batch,
                "unprofiled": unprofiled,
                "profiled_call_ms": round(call_ms, 2),
                # CUDA graph replays in the profiled call: a graph tier that fell back to eager shows 0.
                "graph_replays": (engine._graphs.replays if engine._graphs is not None else 0) - replays,
                **step_profile.summarise_call(kernels, steps),
                "trace": trace.name if trace is not None else None,
            }
            if not kernels:
                out["note"] = "the profiler recorded no CUDA kernels (CUPTI unavailable?)"
            if peers.is_peer(variant):
                with contextlib.suppress(Exception):  # statistics are extra
                    out.update(peers.peer_for(variant).stats(pipe))
            del kernels
            yield out
    engine.close()


def run_profiles(args: argparse.Namespace) -> None:
    """Each tier (or peer) profiled; rows appended to profile-<model>.jsonl as each is done, so a run cut short
    keeps the rows it wrote."""
    for model, variant, path in tier_runs(args, "profile"):
        try:
            for row in profile_rows(args, model, variant):
                summary = row["denoise"] or row["call"]
                log(f"{model} {variant} b{row['batch']}: {json.dumps(summary['per_step'])}")
                append_row(path, row, args.environment)
        except Exception as exc:  # one tier failing must not lose the others' rows
            error = f"{type(exc).__name__}: {exc}"
            log(f"{model} {variant} profile failed: {error}")
            append_row(
                path,
                {"model": model, "tier": variant, **peers.describe(variant), "error": error},
                args.environment,
            )


def append_row(path: Path, row: dict[str, Any], environment: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps({**row, "environment": environment}) + "\n")


def run_server(args: argparse.Namespace) -> None:
    """One lone request per tier through `diffuserve serve` (a fresh server each), after it is ready."""
    import httpx

    from diffuserve.bench.server import SpawnedServer

    repo = MODELS[args.model]
    path = args.out / f"server-{args.model}.jsonl"
    for variant in args.tiers:
        tier, _, setting = variant.partition("/")
        serve = ["--model-repo", repo, "--weights", "random", "--tier", tier, "--model-batch", "1"]
        serve += ["--cache-dir", args.cache_dir, "--devices", "0"]
        path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
        env = {"PYTHONPATH": path, **dict([setting.split("=", 1)] if setting else [])}
        server = SpawnedServer(
            args.out / f"server-{args.model}-{tier}.log", env=env, serve_args=serve, ready_timeout=400
        )
        row: dict[str, Any] = {"model": args.model, "tier": variant, "requests": []}
        started = time.perf_counter()
        with server:
            row["ready_s"] = time.perf_counter() - started
            for seed in range(args.repeats):
                body = {
                    "prompt": PROMPTS[0],
                    "size": f"{args.size}x{args.size}",
                    "seed": seed,
                    "output_format": "jpeg",
                }
                sent = time.perf_counter()
                response = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=300)
                row["requests"].append(
                    {"status": response.status_code, "ms": (time.perf_counter() - sent) * 1000,
                     "server_timing": response.headers.get("server-timing", "")}
                )  # fmt: skip
        log(f"server {variant}: {json.dumps(row)}")
        row["environment"] = args.environment
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def run_digits(args: argparse.Namespace) -> None:
    """Prompt following and distance from eager, per tier, on the trained digits model: the same prompts and
    seeds for every tier, at the served 4 steps and at FLUX.1-dev's 28 (where the step cache has steps to reuse)."""
    from PIL import Image

    from diffuserve.engine.engine import Engine
    from diffuserve.engine.tiers import denoiser_of, step_cache_of
    from diffuserve.models.digits.classifier import load_classifier
    from diffuserve.models.digits.prompts import eval_prompt
    from diffuserve.types import TINY_FLUX

    classifier = load_classifier()
    digits = [d for d in range(10) for _ in range(args.per_class)]
    prompts = [eval_prompt(d, i) for i, d in enumerate(digits)]
    images: dict[tuple[str, int], torch.Tensor] = {}
    rows = []
    for variant in ["E/float32", "E", "XL", "L", "L/FP8_ROUNDING=calibrated", "M", "S"]:
        setting = variant.partition("/")[2]
        dtype = DType.FLOAT32 if setting == "float32" else DType.BFLOAT16
        config = replace(
            config_for(
                variant if dtype is DType.BFLOAT16 else "E",
                "digits",
                Weights.PRETRAINED,
                len(prompts),
                args.cache_dir,
            ),
            dtype=dtype,
        )
        free_gpu()
        engine = Engine(config, "cuda:0")
        engine.load()
        for steps in (4, 28):
            kwargs = {
                "prompt": prompts, "height": TINY_FLUX.native_size, "width": TINY_FLUX.native_size,
                "guidance_scale": TINY_FLUX.default_guidance, "max_sequence_length": TINY_FLUX.max_sequence_length,
                "output_type": "pt", "num_inference_steps": steps,
            }  # fmt: skip
            for _ in range(2):  # compile, capture: the third call is what the server serves
                engine.pipeline(
                    **kwargs, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]
                )
            cache = step_cache_of(denoiser_of(engine.pipeline))
            out = engine.pipeline(
                **kwargs, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]
            )
            pixels = (out.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
            images[(variant, steps)] = out.images.float().cpu()
            read = classifier.predict_images([Image.fromarray(p.numpy()) for p in pixels])
            row: dict[str, Any] = {
                "tier": variant,
                "steps": steps,
                "accuracy": float((read == torch.tensor(digits).numpy()).mean()),
                "reused_steps_per_image": sum(cache.stats.per_step) if cache is not None else 0.0,
            }
            for reference in ("E/float32", "E"):
                if (reference, steps) in images and reference != variant:
                    ref = images[(reference, steps)]
                    row[f"rel_err_vs_{reference}"] = float(
                        (images[(variant, steps)] - ref).norm() / ref.norm()
                    )
            rows.append(row)
            log(f"digits {json.dumps(row)}")
        engine.close()
    write_json(args.out / "digits-quality.json", {"environment": args.environment, "rows": rows})


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=[*MODELS, "digits"], help="one model (server and digits phases)")
    parser.add_argument(
        "--models",
        default=None,
        help=f"pipeline and profile phases: comma-separated, or all ({','.join(MODELS)})",
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="no new model/tier starts after this")
    parser.add_argument("--phase", choices=["pipeline", "server", "profile"], default="pipeline")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="profile phase: also write each call's chrome trace (.json.gz, big)",
    )
    parser.add_argument(
        "--tiers",
        default="E,XL,L",
        help="tiers, each maybe with /CUDA_GRAPHS=off; `family`: E, XL (+ L where it has L); "
        f"peers (pipeline and profile phases): {','.join(peers.PEERS)}",
    )
    parser.add_argument("--batches", default="1", help="batch sizes, e.g. 1,4")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None, help="default: the family's default steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=10, help="digits: prompts per digit")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache-dir", default="/tmp/diffuserve-bench-cache")
    args = parser.parse_args()
    names = args.models or args.model
    if not names:
        parser.error("give --model or --models")
    args.models = list(MODELS) if names == "all" else names.split(",")
    unknown = [m for m in args.models if m not in MODELS and m != "digits"]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    args.model = args.models[0]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    args.out = out_dir(args.out)
    args.tiers = [t for t in args.tiers.split(",") if t]
    if args.phase == "server" and any(peers.is_peer(t) for t in args.tiers):
        parser.error("peers run in the pipeline phase only (the server runs its own tiers)")
    if args.phase == "profile" and "digits" in args.models:
        parser.error("the profile phase runs the random-weight models, not digits")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.environment = environment()
    log(f"environment: {json.dumps(args.environment)}")
    if args.model == "digits":
        run_digits(args)
    elif args.phase == "server":
        run_server(args)
    elif args.phase == "profile":
        run_profiles(args)
    else:
        run_pipelines(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
