"""The built-in digits model on CPU: pipeline time of one 32×32 image and of a batch of 8 at the serving
defaults, per torch thread count, and prompt-following accuracy per step count (`diffuserve eval digits`'s
measure: 20 seeds × 10 digits, judged by the shipped classifier).

    python benchmarks/cpu_digits.py --out docs/bench      # writes cpu-digits.json (~2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import environment, log, out_dir, write_json
from diffuserve.models.digits.classifier import load_classifier
from diffuserve.models.digits.evaluate import evaluate
from diffuserve.models.registry import BUILTIN_MODELS
from diffuserve.types import TINY_FLUX


def timings(pipe: object, threads: list[int], repeats: int, warmup: int) -> list[dict[str, float]]:
    size = TINY_FLUX.native_size

    def run(batch: int) -> float:
        started = time.perf_counter()
        pipe(  # type: ignore[operator]
            prompt=[f"the digit {i % 10}" for i in range(batch)],
            num_inference_steps=TINY_FLUX.default_steps,
            guidance_scale=TINY_FLUX.default_guidance,
            max_sequence_length=TINY_FLUX.max_sequence_length,
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(i) for i in range(batch)],
            output_type="pil",
        )
        return (time.perf_counter() - started) * 1000

    rows = []
    for count in threads:
        torch.set_num_threads(count)
        one: list[float] = []
        eight: list[float] = []
        for _ in range(warmup):
            run(1)
            run(8)
        load_before = os.getloadavg()[0]
        for _ in range(repeats):  # interleaved, so a change in the machine's load hits both sizes alike
            one.append(run(1))
            eight.append(run(8))
        rows.append(
            {
                "threads": count,
                "one_median_ms": statistics.median(one),
                "one_p90_ms": statistics.quantiles(one, n=10)[-1],
                "eight_median_ms": statistics.median(eight),
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
            }
        )
        log(f"timing: {rows[-1]}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", default="2,3,4,6,8", help="step counts for the accuracy")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per step count (10 digits each)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = out_dir(args.out)
    pipe = BUILTIN_MODELS["digits"]()
    pipe.set_progress_bar_config(disable=True)
    threads = [int(t) for t in args.threads.split(",")]
    data = {"environment": environment(), "timing": timings(pipe, threads, args.repeats, args.warmup)}
    torch.set_num_threads(1)
    classifier = load_classifier()
    data["accuracy"] = []
    for steps in (int(s) for s in args.steps.split(",")):
        result = evaluate(pipe, classifier, range(args.seeds), steps=steps)
        data["accuracy"].append({"steps": steps, "images": result.total, "accuracy": result.accuracy})
        log(f"accuracy at {steps} steps: {result.accuracy:.3f}")
    write_json(out / "cpu-digits.json", data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
