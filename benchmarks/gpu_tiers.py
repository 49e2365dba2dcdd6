"""The acceleration tiers as the server runs them (the engine's own set-up: recipe, CUDA graphs) against plain
diffusers eager (tier E), on random-weight FLUX.1/SDXL; then one lone request per tier through `diffuserve
serve`; or each tier's quality on the trained digits model.

    python benchmarks/gpu_tiers.py --model flux-dev --tiers E,XL,L --batches 1 --repeats 3   # pipeline calls
    python benchmarks/gpu_tiers.py --model flux-dev --phase server --tiers L                 # over HTTP
    python benchmarks/gpu_tiers.py --model digits                                            # quality per tier

A tier may name a setting after a slash, `L/CUDA_GRAPHS=off`, to measure what a technique gives. Random weights
have the released models' architectures, so time and memory are the real models'; their images are noise.
Output (--out, else $OUT): tiers-<model>.jsonl, server-<model>.jsonl, digits-quality.json.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import time
from dataclasses import replace
from typing import Any

import torch

from common import ROOT, environment, log, out_dir, write_json
from diffuserve.engine.config import CudaGraphs, DType, EngineConfig, Weights
from diffuserve.types import Tier

MODELS = {
    "flux-dev": ("black-forest-labs/FLUX.1-dev", 28, 3.5, 512),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", 4, 0.0, 256),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 30, 5.0, None),
}
PROMPTS = ["a photo of a red fox in the snow", "an astronaut riding a horse on the moon", "a bowl of ramen"]


def config_for(variant: str, repo: str, weights: Weights, max_batch: int, cache_dir: str) -> EngineConfig:
    """`L` or `L/CUDA_GRAPHS=off`: the tier and any setting the server would read."""
    tier, _, setting = variant.partition("/")
    config = EngineConfig(
        model_repo=repo, model_name=repo, tier=Tier.parse(tier), max_batch=max_batch, weights=weights,
        dtype=DType.BFLOAT16, cache_dir=cache_dir, warmup=False,
    )  # fmt: skip
    if setting == "CUDA_GRAPHS=off":
        config = replace(config, cuda_graphs=CudaGraphs.OFF)
    elif setting:
        raise SystemExit(f"unknown setting {setting!r} (known: CUDA_GRAPHS=off)")
    return config


def call_kwargs(model: str, batch: int, steps: int, size: int) -> dict[str, Any]:
    _, _, guidance, text_tokens = MODELS[model]
    kwargs: dict[str, Any] = {
        "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(batch)],
        "height": size,
        "width": size,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        # One CPU generator per image, as the engine does.
        "generator": [torch.Generator("cpu").manual_seed(1000 + i) for i in range(batch)],
        "output_type": "pt",
    }
    if text_tokens:
        kwargs["max_sequence_length"] = text_tokens
    return kwargs


def timed_call(pipe: Any, kwargs: dict[str, Any]) -> dict[str, float]:
    """Wall time of the call, the median step between step-end events, the time to the first step's end (text
    encoders and the first step) and after the last (VAE decode), and peak memory."""
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
    pipe(**kwargs, callback_on_step_end=on_step)
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    steps = sorted(a.elapsed_time(b) for a, b in itertools.pairwise(events))
    return {
        "s": wall,
        "ms_per_step": steps[len(steps) // 2] if steps else float("nan"),
        "first_step_ms": start.elapsed_time(events[0]),
        "decode_ms": events[-1].elapsed_time(end),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def measure(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    from diffuserve.engine.engine import Engine

    repo, steps, _, _ = MODELS[args.model]
    steps = args.steps or steps
    row: dict[str, Any] = {
        "model": args.model,
        "tier": variant,
        "steps": steps,
        "size": args.size,
        "runs": [],
    }
    started = time.perf_counter()
    config = config_for(variant, repo, Weights.RANDOM, max(args.batches), args.cache_dir)
    engine = Engine(config, "cuda:0")
    engine.load()
    row["load_s"] = time.perf_counter() - started
    pipe = engine.pipeline
    for batch in sorted(args.batches, reverse=True):
        # Two short calls per batch size, as the server's warm-up: the first compiles, the second captures.
        started = time.perf_counter()
        for _ in range(2):
            pipe(**call_kwargs(args.model, batch, 2, args.size))
        torch.cuda.synchronize()
        row[f"warmup_b{batch}_s"] = time.perf_counter() - started
    for batch in args.batches:
        for _ in range(args.repeats):
            run = {"batch": batch, **timed_call(pipe, call_kwargs(args.model, batch, steps, args.size))}
            row["runs"].append(run)
            log(f"{args.model} {variant}: {json.dumps(run)}")
    graphs = engine._graphs
    row["graph_replays"] = graphs.replays if graphs is not None else 0
    engine.close()
    return row


def free_gpu() -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def run_pipelines(args: argparse.Namespace) -> None:
    path = args.out / f"tiers-{args.model}.jsonl"
    for variant in args.tiers:
        free_gpu()
        try:
            row = measure(args, variant)
        except Exception as exc:  # one tier failing must not lose the others' numbers
            row = {"model": args.model, "tier": variant, "error": f"{type(exc).__name__}: {exc}"}
            log(f"{variant} failed: {row['error']}")
        row["environment"] = args.environment
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def run_server(args: argparse.Namespace) -> None:
    """One lone request per tier through `diffuserve serve` (a fresh server each), after it is ready."""
    import httpx

    from diffuserve.bench.server import SpawnedServer

    repo = MODELS[args.model][0]
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
    for variant in ["E/float32", "E", "XL", "L", "M", "S"]:
        tier, _, dtype = variant.partition("/")
        config = replace(
            config_for(tier, "digits", Weights.PRETRAINED, len(prompts), args.cache_dir),
            dtype=DType(dtype or "bfloat16"),
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
    parser.add_argument("--model", choices=[*MODELS, "digits"], required=True)
    parser.add_argument("--phase", choices=["pipeline", "server"], default="pipeline")
    parser.add_argument("--tiers", default="E,XL,L", help="tiers, each maybe with /CUDA_GRAPHS=off")
    parser.add_argument("--batches", default="1", help="batch sizes, e.g. 1,4")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (28 / 4 / 30)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=10, help="digits: prompts per digit")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache-dir", default="/tmp/diffuserve-bench-cache")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    args.out = out_dir(args.out)
    args.tiers = [t for t in args.tiers.split(",") if t]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.environment = environment()
    log(f"environment: {json.dumps(args.environment)}")
    if args.model == "digits":
        run_digits(args)
    elif args.phase == "server":
        run_server(args)
    else:
        run_pipelines(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
