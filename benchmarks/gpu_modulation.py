"""How far FLUX's AdaLN modulation from per-call tables moves images on a GPU, against products made at each step.

    python benchmarks/gpu_modulation.py --out $OUT

The trained digits model at tier XL (bf16, compiled) three times on one GPU: with the modulation computed at
each step (the tier without its tables), with the tables (diffuserve.engine.modulation), and with the tables
and the denoiser replayed as CUDA graphs, as a group runs it. The same prompts and seeds, in a row with another
step count in between (a table of another size): per image the largest and mean distance in 0-255 levels from
the per-step images (and the largest between the two tabled pipelines), with how many denoiser calls took their
rows from the tables, how many computed them, and the graphs' replays. Then the last call's table against the
same products made one row at a time: how many of its rows differ, and by how much at most.
Raw output: --out/modulation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CALLS = (("the digit 3", 28), ("a 7", 28), ("nine", 28), ("zero", 28), ("the digit 3", 12), ("a 7", 28))


def build(tables: bool, graphs: bool, device: str, cache_dir: str) -> tuple[Any, Any]:
    from diffuserve.engine.graphs import enable_cuda_graphs
    from diffuserve.engine.loader import load_pipeline
    from diffuserve.engine.tiers import apply_recipe, denoiser_of, recipe_for

    loaded = load_pipeline("digits", device=device, dtype_name="auto", weights="pretrained", hf_token=None)
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    recipe = replace(recipe_for("XL"), step_modulation=tables)
    apply_recipe(pipe, recipe, device=device, cache_dir=cache_dir)
    hook = enable_cuda_graphs(denoiser_of(pipe)) if graphs and device.startswith("cuda") else None
    return pipe, hook


def image(pipe: Any, prompt: str, seed: int, steps: int) -> Any:
    import numpy as np
    import torch

    out = pipe(
        [prompt],
        height=32,
        width=32,
        num_inference_steps=steps,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
    )
    return (out.images[0] * 255).round().astype(np.uint8)


def rows_against_one_at_a_time(model: Any, tables: Any, steps: int) -> dict[str, Any]:
    """The last call's table rows against each norm's product over that step's row alone, made eagerly as the
    tables' own fallback makes a step's rows (the per-step pipeline makes it inside its compiled blocks)."""
    import torch

    from diffuserve.engine.modulation import _embedding

    # The tables' own record of the call they hold: its timesteps as the pipeline passed them, its pooled
    # embedding. The digits model takes no guidance.
    given, pooled = tables._given, tables._pooled
    differing, largest = 0, 0.0
    with torch.no_grad():
        for step in range(steps):
            embedding = _embedding(model, given[step].expand(1), None, pooled, pooled.dtype)
            for linear in tables.linears:
                row = linear.compute(embedding)
                gap = float((row.float() - linear.table[step, :1].float()).abs().max())
                differing += gap > 0
                largest = max(largest, gap)
    return {"compared": steps * len(tables.linears), "differing": differing, "max_abs": largest}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--cache-dir", default="/tmp/diffuserve-modulation-cache")
    args = parser.parse_args()
    import numpy as np

    from diffuserve.engine.modulation import ATTRIBUTE
    from diffuserve.engine.tiers import denoiser_of
    from gpu_serving import environment

    per_step, _ = build(False, False, args.device, args.cache_dir)
    without_graphs, _ = build(True, False, args.device, args.cache_dir)
    tabled, hook = build(True, True, args.device, args.cache_dir)
    calls = []
    for seed, (prompt, steps) in enumerate(CALLS):
        a = image(per_step, prompt, seed, steps).astype(int)
        b = image(tabled, prompt, seed, steps).astype(int)
        c = image(without_graphs, prompt, seed, steps).astype(int)
        distance = np.abs(a - b)
        calls.append(
            {
                "prompt": prompt,
                "steps": steps,
                "max": int(distance.max()),
                "mean": float(distance.mean()),
                "max_tables_without_graphs": int(np.abs(b - c).max()),
            }
        )
    tables = getattr(denoiser_of(tabled), ATTRIBUTE)
    result = {
        "env": environment(),
        "calls": calls,
        "rows": rows_against_one_at_a_time(denoiser_of(tabled), tables, CALLS[-1][1]),
        "lookups": tables.lookups,
        "computed": tables.computed,
        "fill_graphs": tables.captured_fills,
        "fill_graphs_off": tables.fill_graphs_off,
        "replays": None if hook is None else hook.replays,
        "graphs_disabled": None if hook is None else hook.disabled,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "modulation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
