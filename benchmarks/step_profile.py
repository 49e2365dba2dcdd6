"""Where a pipeline call's GPU time goes: kernels by category, busy time, launch gaps, from one torch.profiler run."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MATMUL = "matmul"
ATTENTION = "attention"
ELEMENTWISE = "norm/elementwise"
MEMORY = "memcpy/memset"
CATEGORIES = (MATMUL, ATTENTION, ELEMENTWISE, MEMORY)

# Kernel name → category, tried in this order; the first pattern that matches (re.search, case-insensitive) wins
# and a name matching none is ELEMENTWISE. The order matters:
# 1. Copies and fills first: kineto names them "Memcpy HtoD (Pageable -> Device)", "Memset (Device)".
# 2. inductor's pointwise/reduction kernels next: they are named after the aten ops fused into them, so the RoPE
#    that feeds an SDPA or the bias-gelu after an addmm says "scaled_dot_product" or "addmm" yet is elementwise.
# 3. Attention before matmul: attention kernels often say cutlass/gemm/xmma too (xformers' fmha_cutlassF, cuDNN's
#    flash SDPA).
# 4. Matmuls: cuBLAS/cuBLASLt (gemm, gemv, nvjet, splitKreduce), CUTLASS (fp8 `_scaled_mm`, torchao), sm90 xmma,
#    inductor's mm templates; then convolutions (the VAE's: implicit gemms on the same tensor cores), but not
#    cuDNN's convertTensor casts.
CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (category, re.compile(pattern, re.IGNORECASE))
    for category, pattern in (
        (MEMORY, r"^mem(cpy|set)\b"),
        (ELEMENTWISE, r"^triton_(poi|red|per)_"),
        (ATTENTION, r"flash|fmha|sdpa|scaled_dot_product|attention|cutlassF"),
        (MATMUL, r"gemm|gemv|cutlass|cublas|xmma|nvjet|scaled_mm|matmul|splitKreduce|^triton_\w*mm"),
        (MATMUL, r"conv(?!ert|ersion)"),
    )
)

# The kernel that gpu_tiers.py launches at each step end (torch.cuda._sleep(1): at::cuda's spin_kernel, a few µs,
# a name no pipeline uses): its end times bound the denoising steps on the GPU's own clock. Never counted as work.
STEP_MARKER = "spin_kernel"

# kineto's activity types of device work; gpu_user_annotation (record_function ranges drawn over kernels, which
# torch.compile adds) would count the same time twice.
DEVICE_ACTIVITIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})

TOP_KERNELS = 10
NAME_CHARS = 80


@dataclass(frozen=True)
class Kernel:
    """One piece of device work: its name and its interval on the GPU, in ns."""

    name: str
    start_ns: int
    end_ns: int

    @property
    def ns(self) -> int:
        return self.end_ns - self.start_ns


@functools.lru_cache(maxsize=4096)  # a call repeats a few hundred names tens of thousands of times
def classify(name: str) -> str:
    for category, pattern in CLASSES:
        if pattern.search(name):
            return category
    return ELEMENTWISE


def union_ns(intervals: Iterable[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals: kernels on several streams overlap and count once."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def is_marker(kernel: Kernel) -> bool:
    return STEP_MARKER in kernel.name


def step_window(kernels: list[Kernel]) -> tuple[int, int, int] | None:
    """(first step end, last step end, steps between them) from the step markers; None with fewer than two.
    The first step is left out, as gpu_tiers' ms/step (the median between step ends) leaves it out."""
    ends = sorted(k.end_ns for k in kernels if is_marker(k))
    if len(ends) < 2:
        return None
    return ends[0], ends[-1], len(ends) - 1


def clipped(kernels: list[Kernel], start_ns: int, end_ns: int) -> list[Kernel]:
    """The kernels' parts inside [start_ns, end_ns): a kernel straddling a step end counts for its share."""
    out = []
    for k in kernels:
        start, end = max(k.start_ns, start_ns), min(k.end_ns, end_ns)
        if end > start:
            out.append(Kernel(k.name, start, end))
    return out


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def summarise(kernels: list[Kernel], steps: int, span: tuple[int, int] | None = None) -> dict[str, Any]:
    """Per category: total ms, ms per step, share of the wall time; busy (union of kernels), wall (first kernel
    start to last end, or `span`), gaps = wall − busy (the GPU idle: launches, host work, syncs); the top kernels.
    Markers are left out. Shares are of the wall time, so with one stream categories + gaps ≈ 1."""
    work = [k for k in kernels if not is_marker(k)]
    per = max(steps, 1)
    if span is None:
        span = (min((k.start_ns for k in work), default=0), max((k.end_ns for k in work), default=0))
    wall = max(span[1] - span[0], 0)
    busy = union_ns((k.start_ns, k.end_ns) for k in work)
    by_category = dict.fromkeys(CATEGORIES, 0)
    by_name: dict[str, list[int]] = {}
    for k in work:
        by_category[classify(k.name)] += k.ns
        entry = by_name.setdefault(k.name, [0, 0])
        entry[0] += k.ns
        entry[1] += 1
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    summed = sum(by_category.values())
    return {
        "steps": steps,
        "kernels": len(work),
        "wall_ms": _ms(wall),
        "gpu_busy_ms": _ms(busy),
        "gaps_ms": _ms(wall - busy),
        "kernel_sum_ms": _ms(summed),  # above gpu_busy_ms where streams overlap
        "busy_share": round(busy / wall, 4) if wall else None,
        "per_step": {
            "wall_ms": _ms(wall / per),
            "gpu_busy_ms": _ms(busy / per),
            "gaps_ms": _ms((wall - busy) / per),
        },
        "categories": {
            name: {
                "ms": _ms(ns),
                "ms_per_step": _ms(ns / per),
                "share": round(ns / wall, 4) if wall else None,
            }
            for name, ns in by_category.items()
        },
        "top_kernels": [
            {"name": name[:NAME_CHARS], "ms": _ms(ns), "count": count, "category": classify(name)}
            for name, (ns, count) in top
        ],
    }


def summarise_call(kernels: list[Kernel], steps: int) -> dict[str, Any]:
    """The whole call (text encoders, steps, decode; per step = over `steps`) and, where the step markers are
    there, the denoising steps alone (between the first and the last step end), which the table reports."""
    window = step_window(kernels)
    denoise = None
    if window is not None:
        start, end, between = window
        denoise = summarise(clipped(kernels, start, end), between, (start, end))
    return {"call": summarise(kernels, steps), "denoise": denoise}


def kernels_from_profiler(prof: Any) -> list[Kernel]:
    """The device work a torch.profiler.profile (or torch.autograd.profiler.profile) recorded: kineto's raw
    events where it has them (no FunctionEvent tree built: a 28-step eager call has ~10⁵ events), else
    prof.events(). A CPU-only run gives []."""
    inner = getattr(prof, "profiler", None) or prof
    results = getattr(inner, "kineto_results", None)
    if results is not None:
        try:
            kernels = [
                Kernel(e.name(), int(e.start_ns()), int(e.start_ns()) + int(e.duration_ns()))
                for e in results.events()
                if _is_device_work(
                    getattr(e, "activity_type", lambda: None)(), e.device_type(), e.is_user_annotation()
                )
            ]
        except (AttributeError, RuntimeError, TypeError):
            kernels = []  # a binding of another torch version: the slower, public route below
        if kernels:
            return kernels
    # torch.profiler.profile has events(); the autograd profiler inside it, function_events.
    events = prof.events() if hasattr(prof, "events") else getattr(prof, "function_events", None)
    return [
        Kernel(e.name, int(e.time_range.start * 1000), int(e.time_range.end * 1000))
        for e in events or []
        if _is_device_work(
            getattr(e, "activity_type", None), e.device_type, getattr(e, "is_user_annotation", False)
        )
    ]


def _is_device_work(activity: Any, device: Any, annotation: bool) -> bool:
    """A kernel, copy or fill on the GPU, by kineto's activity type where given, else by device and kind."""
    from torch.autograd import DeviceType

    if activity is not None:
        return str(activity).rsplit(".", 1)[-1].lower() in DEVICE_ACTIVITIES
    return bool(device == DeviceType.CUDA and not annotation)
