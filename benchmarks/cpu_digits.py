"""Pipeline time of the built-in digits model on CPU: one 32×32 image and a batch of 8 at the serving defaults."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import diffusers
    import torch

    from diffuserve.models.registry import BUILTIN_MODELS
    from diffuserve.types import TINY_FLUX

    pipe = BUILTIN_MODELS["digits"]()
    pipe.set_progress_bar_config(disable=True)
    size = TINY_FLUX.native_size

    def run(batch: int) -> float:
        started = time.perf_counter()
        pipe(
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

    load = os.getloadavg()
    print(
        f"digits model, {size}×{size}, {TINY_FLUX.default_steps} steps, output_type=pil; "
        f"{_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"{datetime.date.today().isoformat()}; load average at start {load[0]:.1f}"
    )
    print()
    print(
        "| threads | 1 image, median ms | p90 ms | batch of 8, median ms | per image ms | batch 8 / 1 image |"
    )
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        # Interleaved, so a change in the machine's load hits both sizes alike.
        one: list[float] = []
        eight: list[float] = []
        for _ in range(args.warmup):
            run(1)
            run(8)
        for _ in range(args.repeats):
            one.append(run(1))
            eight.append(run(8))
        one_med, eight_med = statistics.median(one), statistics.median(eight)
        p90 = statistics.quantiles(one, n=10)[-1]
        print(
            f"| {threads} | {one_med:.1f} | {p90:.1f} | {eight_med:.1f} | {eight_med / 8:.1f} | "
            f"{eight_med / one_med:.2f}× |"
        )
    print()
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
