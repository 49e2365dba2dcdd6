"""Step-cache calibration on the trained digits model (CPU, fp32): accuracy, reuse and error per tier/threshold.

    .venv/bin/python benchmarks/calibrate_step_cache.py --out docs/bench/step-cache-calibration.json

Every variant generates the same prompts with the same seeds (one generator per image) as plain eager fp32;
for each it records prompt-following accuracy (the digits classifier), reused steps per image, and the
relative L2 error and PSNR against eager. The thresholds quoted in engine/tiers/recipes.py come from this
output (docs/bench/step-cache-calibration.json). Raw JSON goes to --out and to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffuserve.engine.tiers import (  # noqa: E402
    apply_recipe,
    denoiser_of,
    recipe_for,
    step_cache_of,
)

# The first-block cache's thresholds swept with S's other limits, beside the tiers as shipped.
SWEEP = [0.05, 0.08, 0.1, 0.12, 0.15, 0.2]


def compare(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Relative L2 error (percent) and PSNR (dB, images in [0, 1]) against the reference images."""
    mse = float(((images - reference) ** 2).mean())
    rel = float((images - reference).norm() / reference.norm().clamp_min(1e-12))
    psnr = float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse)))
    return {"rel_err_pct": 100 * rel, "psnr_db": psnr}


def to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def variants() -> list[tuple[str, Any]]:
    """(name, recipe or None for plain eager)."""
    out: list[tuple[str, Any]] = [("eager", None), ("M", recipe_for("M")), ("S", recipe_for("S"))]
    out += [(f"S@{t}", recipe_for("S", step_cache_threshold=t)) for t in SWEEP]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-class", type=int, default=10, help="prompts per digit (10 digits)")
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the raw JSON here too")
    args = parser.parse_args()

    import diffusers
    from diffusers import FluxPipeline

    from diffuserve.models.digits.classifier import load_classifier
    from diffuserve.models.digits.evaluate import quality_inputs
    from diffuserve.models.registry import DIGITS_DIR

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    classifier = load_classifier()
    digits, prompts, kwargs = quality_inputs(args.per_class)
    rows: list[dict[str, Any]] = []
    reference: dict[int, torch.Tensor] = {}
    for name, recipe in variants():
        pipe = FluxPipeline.from_pretrained(str(DIGITS_DIR), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        notes = [] if recipe is None else apply_recipe(pipe, recipe, device="cpu", cache_dir="/tmp")
        for steps in args.steps:
            gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
            t0 = time.perf_counter()
            images = pipe(**kwargs, num_inference_steps=steps, generator=gens).images.float()
            seconds = time.perf_counter() - t0
            cache = step_cache_of(denoiser_of(pipe))
            reused = sum(cache.stats.per_step) if cache is not None else 0.0
            predicted = classifier.predict_images(to_pil(images))
            row: dict[str, Any] = {
                "variant": name,
                "steps": steps,
                "accuracy_pct": 100 * float((predicted == torch.tensor(digits).numpy()).mean()),
                "reused_steps_per_image": reused,
                "reuse_pct": 100 * reused / steps,
                "seconds": round(seconds, 3),
                "notes": notes,
            }
            if name == "eager":
                reference[steps] = images
            else:
                row["vs_eager"] = compare(images, reference[steps])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "notes"}), file=sys.stderr, flush=True)
    result = {
        "script": "benchmarks/calibrate_step_cache.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "images": len(prompts),
        "device": "cpu",
        "dtype": "float32",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
