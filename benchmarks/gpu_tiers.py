"""GPU benchmark of the acceleration tiers: diffusers eager bf16 vs XL/L/M/S on random-weight FLUX.1/SDXL (H100).

One model per call (each part fits in 10 minutes):

    python benchmarks/gpu_tiers.py --model flux-dev --phase pipeline   # eager + every tier, batch 1 and 4
    python benchmarks/gpu_tiers.py --model flux-dev --phase server     # one request per tier through the server,
                                                                       # and first vs second start (compile cache)
    python benchmarks/gpu_tiers.py --model digits                      # quality per tier on the trained digits model

Random weights have the real architectures (the released models' configs), so time and memory are those of
the real models; their images are noise, so their deviations are only a smoke check. Quality is judged on the
trained digits model. Results go to --out as JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffuserve.engine.tiers import (  # noqa: E402
    Tier,
    apply_recipe,
    denoiser_of,
    recipe_for,
    save_compile_cache,
    step_cache_of,
)
from diffuserve.engine.tiers.cache import CacheStats  # noqa: E402

CEILING = "S-ceiling"


@dataclass(frozen=True)
class ModelSpec:
    repo: str
    steps: int
    guidance: float
    max_sequence_length: int | None


MODELS = {
    "flux-dev": ModelSpec("black-forest-labs/FLUX.1-dev", 28, 3.5, 512),
    "flux-schnell": ModelSpec("black-forest-labs/FLUX.1-schnell", 4, 0.0, 256),
    "sdxl": ModelSpec("stabilityai/stable-diffusion-xl-base-1.0", 30, 5.0, None),
}
# Targets from issue 4, seconds per image at 1024², batch 1.
TARGETS = {
    "flux-dev": {"XL": 3.3, "L": 2.2, "S": 1.2},
    "flux-schnell": {"XL": 0.55, "L": 0.40, "S": 0.30},
    "sdxl": {"XL": 1.5, "L": 1.1, "S": 0.8},
}
PROMPTS = [
    "a photo of a red fox in the snow",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, studio lighting",
    "a watercolor painting of a lighthouse",
]
TIER_ORDER = ["eager", "XL", "L", "M", "S", CEILING]


def recipe_of(tier: str) -> Any:
    # The ceiling variant: S with every step the cache's limits allow reused (threshold 1). Not a quality setting:
    # it shows the speed the step cache gives at its largest reuse, since random weights never trigger it.
    if tier == CEILING:
        return recipe_for("S", step_cache_threshold=1.0)
    return recipe_for(tier)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class RunResult:
    batch: int
    total_s: float
    s_per_image: float
    ms_per_step: float
    first_step_s: float  # text encoders + first step
    decode_s: float  # after the last step: VAE decode + postprocess
    peak_gib: float
    reused_steps: float | None = None


@dataclass
class TierResult:
    model: str
    tier: str
    build_s: float = 0.0
    apply_s: float = 0.0
    warmup_s: dict[str, float] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vs_eager: dict[str, float] = field(default_factory=dict)
    vs_xl: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def free_gpu() -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def build(model: str, device: str) -> Any:
    from diffuserve.models.random_weights import build_random_pipeline

    pipe = build_random_pipeline(MODELS[model].repo, device=device, dtype=torch.bfloat16, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(model: str, batch: int, steps: int, size: int) -> dict[str, Any]:
    spec = MODELS[model]
    kwargs: dict[str, Any] = {
        "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(batch)],
        "height": size,
        "width": size,
        "num_inference_steps": steps,
        "guidance_scale": spec.guidance,
        # One CPU generator per image, as the engine does: the same seed gives the same noise in any batch.
        "generator": [torch.Generator("cpu").manual_seed(1000 + i) for i in range(batch)],
        "output_type": "pt",
    }
    if spec.max_sequence_length:
        kwargs["max_sequence_length"] = spec.max_sequence_length
    return kwargs


def timed_call(pipe: Any, kwargs: dict[str, Any]) -> tuple[RunResult, torch.Tensor]:
    events: list[torch.cuda.Event] = []

    def on_step(_pipe: Any, _i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)
        return callback_kwargs

    cache = step_cache_of(denoiser_of(pipe))
    if cache is not None:
        cache.stats = CacheStats()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    wall = time.perf_counter()
    start.record()
    images = pipe(**kwargs, callback_on_step_end=on_step).images
    end.record()
    torch.cuda.synchronize()
    total = time.perf_counter() - wall
    steps = len(events)
    batch = len(kwargs["prompt"])
    span = events[0].elapsed_time(events[-1]) if steps > 1 else 0.0
    result = RunResult(
        batch=batch,
        total_s=total,
        s_per_image=total / batch,
        ms_per_step=span / (steps - 1) if steps > 1 else float("nan"),
        first_step_s=start.elapsed_time(events[0]) / 1e3,
        decode_s=events[-1].elapsed_time(end) / 1e3,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        # Sum of per-step reuse fractions = steps reused per image (CFG doubles the UNet's rows, not the steps).
        reused_steps=sum(cache.stats.per_step) if cache is not None else None,
    )
    return result, images.float().cpu()


def compare(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, images in [0, 1]) and relative L2 error against a reference on the same prompts and seeds."""
    mse = float(((images - reference) ** 2).mean())
    rel = float((images - reference).norm() / reference.norm().clamp_min(1e-12))
    psnr = float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse)))
    return {"psnr_db": psnr, "rel_l2": rel}


class TierTimeout(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise TierTimeout("tier took longer than --tier-timeout-s")


def measure_tier(args: argparse.Namespace, tier: str, refs: dict[str, torch.Tensor]) -> TierResult:
    result = TierResult(model=args.model, tier=tier)
    free_gpu()
    # A compile that runs away must cost one tier, not the whole call's numbers.
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(args.tier_timeout_s))
    t0 = time.perf_counter()
    pipe = build(args.model, "cuda")
    torch.cuda.synchronize()
    result.build_s = time.perf_counter() - t0
    try:
        if tier != "eager":
            t0 = time.perf_counter()
            result.notes = apply_recipe(pipe, recipe_of(tier), device="cuda", cache_dir=args.cache_dir)
            result.apply_s = time.perf_counter() - t0
        # Warm-up: a short call per batch size compiles every graph (the blocks are the same at every step).
        for batch in args.batches:
            t0 = time.perf_counter()
            pipe(**call_kwargs(args.model, batch, args.warmup_steps, args.size))
            torch.cuda.synchronize()
            result.warmup_s[f"b{batch}"] = time.perf_counter() - t0
        for batch in args.batches:
            for _ in range(args.repeats):
                run, images = timed_call(pipe, call_kwargs(args.model, batch, args.steps, args.size))
                result.runs.append(run)
                log(f"{args.model} {tier} b{batch}: {json.dumps(asdict(run))}")
            if batch == 1:
                refs.setdefault(tier, images)
                if "eager" in refs and tier != "eager":
                    result.vs_eager = compare(images, refs["eager"])
                if "XL" in refs and tier not in ("eager", "XL"):
                    result.vs_xl = compare(images, refs["XL"])
                finite = bool(torch.isfinite(images).all())
                if not finite:
                    result.notes.append("non-finite pixels in the output")
    except Exception as exc:  # one tier failing must not lose the others' numbers
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"{args.model} {tier} FAILED: {result.error}")
    finally:
        signal.alarm(0)
        del pipe
        free_gpu()
    return result


# Start probe: one fresh process = one server start (build, apply tier, warm-up, save compile cache) ----------------
def probe_start(args: argparse.Namespace) -> None:
    timings: dict[str, Any] = {}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    pipe = build(args.model, "cuda")
    torch.cuda.synchronize()
    timings["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    notes = apply_recipe(pipe, recipe_of(args.probe_tier), device="cuda", cache_dir=args.cache_dir)
    timings["apply_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe(**call_kwargs(args.model, 1, MODELS[args.model].steps, args.size))
    torch.cuda.synchronize()
    timings["warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    timings["cache_file"] = save_compile_cache(args.cache_dir)
    timings["save_s"] = time.perf_counter() - t0
    timings["start_total_s"] = time.perf_counter() - t_all
    timings["notes"] = notes
    print("PROBE " + json.dumps(timings), flush=True)


def run_probe(args: argparse.Namespace, cache_dir: str, label: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    cmd = [sys.executable, __file__, "--probe", "--model", args.model, "--probe-tier", args.probe_tier]
    cmd += ["--cache-dir", cache_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        log(f"probe {label} failed rc={proc.returncode}: {proc.stderr[-2000:]}")
        return {"label": label, "error": proc.stderr[-500:], "process_wall_s": wall}
    data = json.loads(lines[-1][len("PROBE ") :])
    data.update(label=label, process_wall_s=wall)
    log(f"probe {label}: {json.dumps(data)}")
    return data


# Server phase: the real `diffuserve serve`, one request per tier ---------------------------------------------------
def serve_one(args: argparse.Namespace, tier: str) -> dict[str, Any]:
    import httpx

    from diffuserve.bench.server import SpawnedServer, StartError

    serve_args = [
        "--model-repo", MODELS[args.model].repo, "--weights", "random", "--tier", tier,
        "--model-batch", "1", "--cache-dir", args.cache_dir, "--devices", "0",
    ]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    logfile = Path(args.out) / f"server-{args.model}-{tier}.log"
    # The bench's spawner: own session, polled until ready (or failed), whole group stopped on the way out.
    server = SpawnedServer(
        logfile, env=env, ready_timeout=args.server_start_timeout, serve_args=serve_args, stop_grace=30
    )
    command = ["-m", "diffuserve.cli", "serve", "--port", str(server.port), *serve_args]
    out: dict[str, Any] = {"model": args.model, "tier": tier, "command": " ".join(command)}
    t0 = time.perf_counter()
    try:
        with server:
            out["ready_s"] = time.perf_counter() - t0
            body = {"prompt": PROMPTS[0], "size": "1024x1024", "seed": 7, "response_format": "b64_json"}
            t1 = time.perf_counter()
            r = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=300)
            out["request_s"] = time.perf_counter() - t1
            out["status"] = r.status_code
            out["model_name"] = r.headers.get("x-model")
            if r.status_code == 200:
                from PIL import Image

                try:
                    png = base64.b64decode(r.json()["data"][0]["b64_json"])
                    out["image_size"] = Image.open(io.BytesIO(png)).size
                except (ValueError, KeyError, IndexError, TypeError, OSError) as exc:
                    out["error"] = f"HTTP 200 without a readable image: {type(exc).__name__}: {exc}"
            else:
                out["error"] = r.text[:300]
    except StartError as exc:
        out["ready_s"] = time.perf_counter() - t0
        out["error"] = f"not ready ({exc.reason}); see {logfile.name}"
        return out
    log(f"server {args.model} {tier}: {json.dumps(out)}")
    return out


# Quality on the trained digits model ------------------------------------------------------------------------------
def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def run_digits(args: argparse.Namespace) -> int:
    """Prompt-following accuracy per tier and deviation from XL/eager, same prompts and seeds for every tier."""
    from diffusers import FluxPipeline

    from diffuserve.models.registry import DIGITS_DIR

    if not (DIGITS_DIR / "model_index.json").exists():
        log(f"digits model not present at {DIGITS_DIR}: quality run skipped")
        return 0
    from diffuserve.models.digits.classifier import load_classifier
    from diffuserve.models.digits.evaluate import quality_inputs

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    classifier = load_classifier()
    digits, prompts, kwargs = quality_inputs(args.digits_per_class)
    # The served default, and FLUX.1-dev's 28 steps: step caching only has slow-changing steps to reuse at many steps.
    step_counts = [int(n) for n in args.digits_steps.split(",")]
    # The served dtype (bf16 on GPU); fp32 eager on GPU gives the bf16 noise floor that XL is held to.
    variants = (["eager-fp32"] if cuda else []) + ["eager", "XL", "L", "M", "S"]
    images: dict[tuple[str, int], torch.Tensor] = {}
    rows = []
    for variant in variants:
        dtype = torch.float32 if (variant == "eager-fp32" or not cuda) else torch.bfloat16
        free_gpu() if cuda else gc.collect()
        pipe = FluxPipeline.from_pretrained(str(DIGITS_DIR), torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        notes = []
        if not variant.startswith("eager"):
            notes = apply_recipe(pipe, recipe_for(variant), device=device, cache_dir=args.cache_dir)
        for steps in step_counts:

            def generate(pipe: Any = pipe, steps: int = steps) -> torch.Tensor:
                gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
                return pipe(**kwargs, num_inference_steps=steps, generator=gens).images.float().cpu()

            generate()  # warm-up (compiles on GPU)
            cache = step_cache_of(denoiser_of(pipe))
            if cache is not None:
                cache.stats = CacheStats()
            t0 = time.perf_counter()
            out = generate()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            images[(variant, steps)] = out
            predicted = classifier.predict_images(_to_pil(out))
            accuracy = float((predicted == torch.tensor(digits).numpy()).mean())
            row: dict[str, Any] = {
                "variant": variant,
                "steps": steps,
                "device": device,
                "dtype": str(dtype).replace("torch.", ""),
                "accuracy": accuracy,
                "seconds": elapsed,
                "reused_steps_per_image": sum(cache.stats.per_step) if cache is not None else 0.0,
                "notes": notes,
            }
            for ref in ("eager", "XL", "eager-fp32"):
                if (ref, steps) in images and ref != variant:
                    row[f"vs_{ref}"] = compare(out, images[(ref, steps)])
            rows.append(row)
            log(f"digits {variant} {steps} steps: {json.dumps(row)}")
        del pipe
    lines = [
        f"## digits quality on {device} ({len(prompts)} prompts × steps {step_counts}): {json.dumps(versions())}",
        "| variant | steps | dtype | accuracy | reused steps/img | s (100 images) | PSNR vs XL dB | rel err vs XL | rel err vs eager | rel err vs eager-fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: r["steps"]):
        vx, ve, vf = row.get("vs_XL", {}), row.get("vs_eager", {}), row.get("vs_eager-fp32", {})
        lines.append(
            f"| {row['variant']} | {row['steps']} | {row['dtype']} | {row['accuracy']:.3f} | "
            f"{row['reused_steps_per_image']:.1f} | {row['seconds']:.2f} | "
            f"{vx.get('psnr_db', float('nan')):.1f} | {vx.get('rel_l2', float('nan')):.4f} | "
            f"{ve.get('rel_l2', float('nan')):.4f} | {vf.get('rel_l2', float('nan')):.4f} |"
        )
    if cuda:
        for steps in step_counts:
            if ("XL", steps) not in images:
                continue
            floor = compare(images[("eager", steps)], images[("eager-fp32", steps)])["rel_l2"]
            xl = compare(images[("XL", steps)], images[("eager", steps)])["rel_l2"]
            verdict = "PASS" if xl <= floor else "FAIL"
            lines.append(
                f"\n{steps} steps: XL vs eager bf16 rel err {xl:.4f}; threshold = eager bf16 vs eager fp32 "
                f"(the bf16 noise floor) {floor:.4f}: {verdict}"
            )
    text = "\n".join(lines)
    with open(Path(args.out) / f"digits-quality-{device}.md", "w") as fh:
        fh.write(text + "\n")
    with open(Path(args.out) / f"digits-quality-{device}.json", "w") as fh:
        json.dump(rows, fh, indent=1)
    print(text, flush=True)
    return 0


# Reports ----------------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import diffusers
    import transformers

    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = "absent"
    return info


def pipeline_table(results: list[TierResult]) -> str:
    lines = [
        "| model | tier | batch | s/image | ms/step | text+1st step s | decode s | peak GiB | warm-up s | reused steps/img | PSNR vs eager | rel err vs eager | target s/img (b1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if res.error and not res.runs:
            lines.append(f"| {res.model} | {res.tier} | - | failed: {res.error[:80]} |||||||||")
            continue
        for run in res.runs:
            target = TARGETS.get(res.model, {}).get(res.tier) if run.batch == 1 else None
            warm = res.apply_s + res.warmup_s.get(f"b{run.batch}", 0.0)
            cmp_ = res.vs_eager if run.batch == 1 else {}
            reused = f"{run.reused_steps:.1f}" if run.reused_steps is not None else "-"
            lines.append(
                f"| {res.model} | {res.tier} | {run.batch} | {run.s_per_image:.3f} | {run.ms_per_step:.1f} | "
                f"{run.first_step_s:.3f} | {run.decode_s:.3f} | {run.peak_gib:.1f} | {warm:.1f} | {reused} | "
                f"{cmp_.get('psnr_db', float('nan')):.1f} | {cmp_.get('rel_l2', float('nan')):.4f} | "
                f"{'≤ ' + str(target) if target else '-'} |"
            )
    return "\n".join(lines)


def run_pipeline_phase(args: argparse.Namespace) -> list[TierResult]:
    refs: dict[str, torch.Tensor] = {}
    results = []
    started = time.perf_counter()
    for tier in args.tiers:
        if time.perf_counter() - started > args.budget_s:
            log(f"time budget spent: tier {tier} not measured")
            results.append(TierResult(model=args.model, tier=tier, error="skipped: time budget"))
            continue
        log(f"=== {args.model} {tier}")
        res = measure_tier(args, tier, refs)
        results.append(res)
        with open(Path(args.out) / f"pipeline-{args.model}.jsonl", "a") as fh:
            fh.write(json.dumps(asdict(res)) + "\n")
        for note in res.notes:
            log(f"  note: {note}")
    return results


def run_server_phase(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": [], "starts": []}
    started = time.perf_counter()
    if args.probe_tier:
        fresh = str(Path(args.out_tmp) / f"probe-cache-{args.model}")
        shutil.rmtree(fresh, ignore_errors=True)
        out["starts"].append(run_probe(args, fresh, "first start (empty cache dir)"))
        out["starts"].append(run_probe(args, fresh, "second start (persisted compile cache)"))
    for tier in args.server_tiers:
        if time.perf_counter() - started > args.budget_s:
            log(f"time budget spent: server tier {tier} not run")
            out["requests"].append({"model": args.model, "tier": tier, "error": "skipped: time budget"})
            continue
        out["requests"].append(serve_one(args, tier))
    with open(Path(args.out) / f"server-{args.model}.json", "w") as fh:
        json.dump(out, fh, indent=1)
    return out


def server_table(out: dict[str, Any]) -> str:
    lines = [
        "| model | tier | server ready s | request s | status | served name |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["requests"]:
        lines.append(
            f"| {r['model']} | {r['tier']} | {r.get('ready_s', float('nan')):.1f} | "
            f"{r.get('request_s', float('nan')):.2f} | {r.get('status', r.get('error', '-'))} | {r.get('model_name', '-')} |"
        )
    if out["starts"]:
        lines += [
            "",
            "| start | build s | apply s | warm-up s | save cache s | total s |",
            "|---|---|---|---|---|---|",
        ]
        for s in out["starts"]:
            lines.append(
                f"| {s['label']} | {s.get('build_s', float('nan')):.1f} | {s.get('apply_s', float('nan')):.1f} | "
                f"{s.get('warmup_s', float('nan')):.1f} | {s.get('save_s', float('nan')):.1f} | "
                f"{s.get('start_total_s', float('nan')):.1f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=[*MODELS, "digits"], required=True)
    parser.add_argument("--phase", choices=["pipeline", "server", "all"], default="pipeline")
    parser.add_argument("--tiers", default=",".join(TIER_ORDER), help="eager and/or XL,L,M,S")
    parser.add_argument("--server-tiers", default="XL,L,M,S")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (28 / 4 / 30)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting new work after this")
    parser.add_argument("--tier-timeout-s", type=float, default=240.0)
    parser.add_argument("--server-start-timeout", type=float, default=300.0)
    parser.add_argument(
        "--probe-tier", default=None, help="tier for the first/second start probe (server phase)"
    )
    parser.add_argument(
        "--probe", action="store_true", help=argparse.SUPPRESS
    )  # one start, in a child process
    parser.add_argument("--digits-per-class", type=int, default=10)
    parser.add_argument("--digits-steps", default="4,28", help="step counts for the digits quality run")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    args.out_tmp = os.environ.get("TMPDIR", "/tmp")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.cache_dir = args.cache_dir or str(Path(args.out_tmp) / "diffuserve-cache")

    if args.model == "digits":
        return run_digits(args)
    if args.probe:
        probe_start(args)
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    args.steps = args.steps or MODELS[args.model].steps
    args.tiers = [t if t in ("eager", CEILING) else Tier.parse(t).value for t in args.tiers.split(",") if t]
    args.server_tiers = [Tier.parse(t).value for t in args.server_tiers.split(",") if t]
    args.batches = [int(b) for b in args.batches.split(",")]
    info = versions()
    log(f"versions: {json.dumps(info)}")
    report = [f"## {args.model}: {json.dumps(info)}", f"command: {' '.join(sys.argv)}", ""]
    if args.phase in ("pipeline", "all"):
        results = run_pipeline_phase(args)
        report += [pipeline_table(results), ""]
    if args.phase in ("server", "all"):
        server = run_server_phase(args)
        report += [server_table(server), ""]
    text = "\n".join(report)
    with open(Path(args.out) / f"table-{args.model}-{args.phase}.md", "w") as fh:
        fh.write(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
