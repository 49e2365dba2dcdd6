"""Whether one seed gives one image across starts of a worker, and where two starts part if not.

    python benchmarks/gpu_repeatability.py --model flux-dev --tiers E,L,L/CUDA_GRAPHS=off --out $OUT

For each tier, three fresh processes set the engine up as a worker does (random weights of the released
architecture, the tier; batch size 1 warmed, then one image of a fixed prompt and seed at the native size and
default steps made twice, as a server's first request is served once its first size is warm; then the other
batch sizes up to `--batch` warmed and the compile artefacts saved):

- `compiled`: an empty cache dir, so warm-up compiles;
- `compiled again`: another empty cache dir, so warm-up compiles again;
- `from artefacts`: the first one's cache dir, so warm-up loads what it saved (a warm start).

Each process keeps the denoiser's inputs (latents, text embeddings, pooled embedding, timestep, guidance) and
output at every step of its first image, by a forward hook on the denoiser (it fires around a CUDA graph's
replay too). Per pair of processes the output says, for each of those tensors, the first step where they
differ and the largest difference; and the images' sha256, largest pixel difference and PSNR. Each process
also says whether its second image equals its first (the same request again in one process). Tier E compiles
nothing: its pairs are the control. Where the text embeddings already differ, the encoders part the starts;
where step 0's inputs agree and its output does not, the denoiser's kernels do.

Output (--out, else $OUT): repeatability-<model>.json.
On CPU (a dry run of the script): `--model digits --device cpu --tiers E,XL --batch 2`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import PROMPT, environment, log, out_dir, write_json
from gpu_startup import image_difference

SEED = 7
# The denoiser's keyword arguments kept per step (FLUX's names; a family without one simply has none).
INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
STARTS = ("compiled", "compiled again", "from artefacts")


def repo_of(model: str) -> tuple[str, str]:
    """The model's repo and its weights: the built-in digits model's own, else random of the released one."""
    if model == "digits":
        return "digits", "pretrained"
    from diffuserve.models.random_weights import RELEASED_REPOS

    return RELEASED_REPOS[model], "random"


def child(args: argparse.Namespace) -> None:
    """One start: set up, warm the first size, two images, warm the rest, save the artefacts; the steps'
    tensors and both images to --dump."""
    import logging

    import torch

    from diffuserve.engine.config import DType, Weights
    from diffuserve.engine.engine import Engine
    from diffuserve.types import BatchItem, BatchJob, Task
    from gpu_tiers import config_for

    notes: list[str] = []

    class Notes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "compile cache" in message:
                notes.append(message)

    logging.getLogger("diffuserve").addHandler(Notes())
    logging.getLogger("diffuserve").setLevel(logging.INFO)
    repo, weights = repo_of(args.model)
    # The tier and any setting after a slash as the tiers benchmark sets them (bfloat16 weights on the GPU).
    config = config_for(args.tier, repo, Weights(weights), args.batch, args.cache_dir)
    if args.device == "cpu":
        config = replace(config, dtype=DType.AUTO)
    engine = Engine(config, "cpu" if args.device == "cpu" else "cuda:0")
    info = engine.load()
    # A worker's order: the first batch size warm, then requests (the image here), while the other sizes warm
    # between batches; the artefacts saved once every size is warm.
    first, *rest = engine.warmup_sizes()
    engine.warm(first)

    steps: list[dict[str, torch.Tensor]] = []
    keep = {"on": True}

    def kept(_module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not keep["on"]:
            return
        step = {
            name: kwargs[name].detach().float().cpu() for name in INPUTS if torch.is_tensor(kwargs.get(name))
        }
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        step["output"] = out.detach().float().cpu()
        steps.append(step)

    pipeline = engine._pipelines[Task.GENERATE]
    denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
    handle = denoiser.register_forward_hook(kept, with_kwargs=True)
    item = BatchItem("repeatability", PROMPT, None, [SEED], "png", None)
    job = BatchJob(
        0, info.native_width, info.native_height, info.default_steps, info.default_guidance, [item]
    )
    images = []
    for _ in range(2):
        computed = engine.compute(job)
        if not hasattr(computed, "pixels"):
            raise SystemExit(f"the image failed: {getattr(computed, 'error', computed)}")
        images.append(computed.pixels[0].copy())
        keep["on"] = False
    handle.remove()
    for size in rest:
        engine.warm(size)
    saved = engine.save_compile_cache()
    torch.save(
        {
            "steps": steps,
            "images": images,
            "notes": notes,
            "saved": saved,
            "start_seconds": engine.phases.named(),
        },
        args.dump,
    )
    engine.close()


def difference(a: Any, b: Any) -> float:
    """The largest absolute difference of two tensors (inf where their shapes differ)."""
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max()) if a.numel() else 0.0


def compare(first: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Per tensor kept: the first step where the two starts differ, and the largest difference over the
    steps."""
    tensors: dict[str, Any] = {}
    for name in [*INPUTS, "output"]:
        # Not strict: a tier with a step cache keeps only the steps it computed; the shorter start decides.
        pairs = [
            (a[name], b[name])
            for a, b in zip(first["steps"], other["steps"], strict=False)
            if name in a and name in b
        ]
        if not pairs:
            continue
        differences = [difference(a, b) for a, b in pairs]
        parted = next((step for step, d in enumerate(differences) if d != 0), None)
        tensors[name] = {"first_step_differing": parted, "largest": max(differences)}
    return {
        "steps_compared": min(len(first["steps"]), len(other["steps"])),
        "tensors": tensors,
        "image": image_difference(first["images"][0], other["images"][0]),
    }


def sha256(image: Any) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def start(args: argparse.Namespace, tier: str, cache_dir: Path, dump: Path) -> dict[str, Any]:
    """One start in a fresh process; its record, and its dump loaded."""
    import torch

    command = [
        sys.executable, __file__, "--child", "--model", args.model, "--tier", tier,
        "--batch", str(args.batch), "--device", args.device, "--cache-dir", str(cache_dir), "--dump", str(dump),
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.start_timeout)
    except subprocess.TimeoutExpired:  # the other starts and tiers still run
        return {"error": f"no image within --start-timeout {args.start_timeout:g} s"}
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}", "seconds": seconds}
    data = torch.load(dump, weights_only=False)
    images = data["images"]
    record = {
        "seconds": seconds,
        "image_sha256": sha256(images[0]),
        "second_image_same": bool((images[0] == images[1]).all()),
        "compile_cache": data["notes"],
        "artefacts_saved": data["saved"] is not None,
        "steps_kept": len(data["steps"]),
        "start_seconds": data["start_seconds"],
    }
    return {**record, "data": data}


def run_tier(args: argparse.Namespace, tier: str, root: Path) -> dict[str, Any]:
    """The three starts of one tier and their pairs."""
    first_cache, second_cache = root / "cache-a", root / "cache-b"
    caches = {"compiled": first_cache, "compiled again": second_cache, "from artefacts": first_cache}
    starts: dict[str, dict[str, Any]] = {}
    for name in STARTS:
        starts[name] = start(args, tier, caches[name], root / f"{name.replace(' ', '-')}.pt")
        log(f"{tier} {name}: {json.dumps({k: v for k, v in starts[name].items() if k != 'data'})}")
    row: dict[str, Any] = {
        "tier": tier,
        "starts": {name: {k: v for k, v in s.items() if k != "data"} for name, s in starts.items()},
        "pairs": {},
    }
    base = starts["compiled"]
    for name in STARTS[1:]:
        if "data" in base and "data" in starts[name]:
            row["pairs"][f"compiled / {name}"] = compare(base["data"], starts[name]["data"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="flux-dev", help="a released family's name, or digits")
    parser.add_argument("--tiers", default="E,L,L/CUDA_GRAPHS=off")
    parser.add_argument(
        "--batch", type=int, default=4, help="the worker's MODEL_BATCH: sizes 1..N are warmed"
    )
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    parser.add_argument("--start-timeout", type=float, default=400.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tier", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    out = out_dir(args.out)
    report: dict[str, Any] = {
        "environment": environment(),
        "settings": {"model": args.model, "batch": args.batch, "prompt": PROMPT, "seed": SEED},
        "tiers": [],
    }
    path = out / f"repeatability-{args.model}.json"
    for tier in args.tiers.split(","):
        with tempfile.TemporaryDirectory(prefix="repeatability-") as root:
            report["tiers"].append(run_tier(args, tier, Path(root)))
        write_json(path, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
