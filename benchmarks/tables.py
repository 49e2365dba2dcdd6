"""The GPU tables of docs/benchmarks.md, generated from the raw outputs committed under docs/bench/ (never retyped).

    python benchmarks/tables.py           # rewrite the generated blocks of docs/benchmarks.md
    python benchmarks/tables.py --check   # exit 1 when the page and the raw outputs disagree (a unit test runs it)

Each block sits between `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
PAGE = ROOT / "docs" / "benchmarks.md"
# The goals the serving path is held to (tax as a share of the bare pipeline call, throughput as a share of the
# GPU-bound rate, warm start in seconds).
TAX_GOAL_PCT = {"webp": 5.0, "png": 10.0, "jpeg": 3.0}
THROUGHPUT_GOAL = 0.97
WARM_START_GOAL_S = 20.0


def load_json(name: str) -> Any:
    return json.loads((BENCH / name).read_text())


def load_jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (BENCH / name).read_text().splitlines() if line.strip()]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def serving_tax() -> str:
    data = load_json("h200-serving.json")
    bare = data["bare"]["b1_median_ms"]
    rows = []
    for label, runs in data["lone"].items():
        fmt = label.split("_")[0]
        ok = [r for r in runs if r["status"] == 200]
        round_trip = median([r["round_trip_ms"] for r in ok])
        phase = {name: median([r["timing"].get(name, 0.0) for r in ok]) for name in ok[0]["timing"]}
        device = phase.get("denoise", 0.0) + phase.get("decode", 0.0)
        # JPEG is encoded on the GPU (nvJPEG) in the server, where the bare process's CPU encoder says nothing
        # of it: no substitution (a photo encodes faster than noise there too, see the encoders table).
        photo_encode = phase.get("encode", 0.0) if fmt == "jpeg" else data["bare"][f"encode_photo_{fmt}_ms"]
        photo_trip = round_trip - phase.get("encode", 0.0) + photo_encode
        outside = round_trip - phase.get("queue", 0.0) - device
        photo_outside = outside - phase.get("encode", 0.0) + photo_encode
        goal = TAX_GOAL_PCT[fmt]
        met = "✓" if 100 * photo_outside / bare <= goal else "✗"
        rows.append(
            [
                label.replace("_", " + "),
                f"{round_trip:.1f}",
                f"{device:.1f} ({phase.get('denoise', 0):.0f} + {phase.get('decode', 0):.0f})",
                f"{phase.get('encode', 0):.1f}",
                f"{phase.get('transfer', 0):.1f}",
                f"{outside:.1f} ({100 * outside / bare:.1f} %)",
                f"{photo_outside:.1f} ({100 * photo_outside / bare:.1f} %) {met} ≤ {goal:g} %",
                f"{photo_trip - bare:+.1f} ({100 * (photo_trip - bare) / bare:+.1f} %)",
            ]
        )
    header = [
        "lone request",
        "HTTP round trip ms",
        "device ms (denoise + decode)",
        "encode ms",
        "transfer ms",
        "round trip − queue − device, noise",
        "same, photo",
        "round trip − bare pipeline, photo",
    ]
    return f"Bare pipeline call to PIL images, batch 1: **{bare:.1f} ms** (median).\n\n" + table(header, rows)


def serving_throughput() -> str:
    data = load_json("h200-serving.json")
    rate = data["gpu_bound_images_per_s"]
    batch = data["args"]["model_batch"]
    bare = data["bare"][f"b{batch}_median_ms"]
    rows = []
    for step in data["closed_loop"]:
        share = step["of_gpu_bound"]
        goal = (
            f" {'✓' if share >= THROUGHPUT_GOAL else '✗'} ≥ {100 * THROUGHPUT_GOAL:g} %"
            if step["users"] >= 8
            else ""
        )
        sizes: dict[int, int] = {}
        for size in step["batch_sizes"]:
            sizes[size] = sizes.get(size, 0) + 1
        rows.append(
            [
                str(step["users"]),
                str(step["requests"]),
                str(step["failures"]),
                f"{step['p50_ms']:.0f}",
                f"{step['images_per_s']:.3f}",
                f"{100 * share:.1f} %{goal}",
                ", ".join(f"{size}: {count}" for size, count in sorted(sizes.items())),
            ]
        )
    header = [
        "users",
        "requests",
        "failures",
        "p50 ms",
        "images/s",
        "of GPU-bound",
        "batch sizes (size: requests)",
    ]
    intro = f"GPU-bound rate: {batch} images ÷ {bare:.0f} ms (bare pipeline, batch {batch}) = **{rate:.3f} images/s**.\n\n"
    return intro + table(header, rows)


def serving_start() -> str:
    data = load_json("h200-serving.json")
    rows = []
    for label in ("cold_start", "warm_start"):
        start = data[label]
        phases = start["worker_phases_s"][0]
        warmups = {k: v for k, v in phases.items() if k.startswith("warmup_b")}
        goal = ""
        if label == "warm_start":
            goal = f" {'✓' if start['ready_s'] <= WARM_START_GOAL_S else '✗'} ≤ {WARM_START_GOAL_S:g}"
        rows.append(
            [
                label.replace("_", " "),
                f"{start['ready_s']:.1f}{goal}",
                f"{phases.get('spawn', 0):.1f}",
                f"{phases.get('import', 0):.1f}",
                f"{phases.get('load', 0):.1f}",
                f"{phases.get('tier', 0):.1f}",
                " + ".join(f"{v:.1f}" for v in warmups.values()) + f" = {sum(warmups.values()):.1f}",
                f"{phases.get('compile_cache_save', 0):.1f}",
            ]
        )
    header = [
        "start",
        "process start → ready s",
        "spawn",
        "import (torch, diffusers, CUDA)",
        "load (build)",
        "tier",
        "warm-up b4 + b3 + b2 + b1",
        "cache save",
    ]
    return table(header, rows)


def encoders() -> str:
    data = load_json("h200-profile.json")["encoders"]
    labels = {
        "webp_m0": "WebP effort 0 (served)",
        "webp_m2": "WebP effort 2 (before)",
        "png_pillow_l1": "PNG, Pillow zlib 1 (before)",
        "png_diffuserve_1core": "PNG, diffuserve, one core",
        "png_diffuserve_pool8": "PNG, diffuserve, 8 pieces (served)",
        "jpeg_pillow_q90": "JPEG q90, Pillow (CPU fallback)",
        "jpeg_nvjpeg": "JPEG q90, nvJPEG on the GPU (served on CUDA)",
    }
    rows = []
    for key, label in labels.items():
        photo, noise = data["photo"][key], data["noise"][key]
        rows.append(
            [
                label,
                f"{photo['ms']:.1f}",
                f"{photo['bytes'] / 1e3:.0f}",
                f"{noise['ms']:.1f}",
                f"{noise['bytes'] / 1e3:.0f}",
            ]
        )
    header = ["encoder (1024², one image)", "photo ms", "photo KB", "noise ms", "noise KB"]
    nv = load_json("h200-profile.json")["nvjpeg"]
    note = (
        f"\n\nnvJPEG check: {nv['iterations']} encodes of the same pixels with other CUDA streams busy, "
        f"{nv['byte_mismatches_vs_first']} byte mismatches; PSNR against the source {nv['psnr_gpu_db'][0]:.1f} dB "
        f"(Pillow's JPEG at the same quality: {nv['psnr_cpu_db'][0]:.1f} dB, "
        f"{nv['bytes_cpu'][0] / 1e3:.0f} KB against {nv['bytes_gpu'][0] / 1e3:.0f} KB)."
    )
    return table(header, rows) + note


def tiers() -> str:
    blocks = []
    names = {
        "flux-dev": "FLUX.1-dev, 28 steps",
        "flux-schnell": "FLUX.1-schnell, 4 steps",
        "sdxl": "SDXL, 30 steps",
    }
    for model, title in names.items():
        results = load_jsonl(f"h200-tiers-{model}.jsonl")
        eager = {
            run["batch"]: run["s_per_image"] for r in results if r["tier"] == "eager" for run in r["runs"]
        }
        rows = []
        for result in results:
            for run in result["runs"]:
                base = eager.get(run["batch"])
                speedup = f"{base / run['s_per_image']:.2f}×" if base and result["tier"] != "eager" else "-"
                rows.append(
                    [
                        result["tier"] if result["tier"] != "eager" else "eager (diffusers bf16)",
                        str(run["batch"]),
                        f"{run['s_per_image']:.3f}",
                        speedup,
                        f"{run['ms_per_step']:.1f}",
                        f"{run['first_step_s'] * 1000:.0f}",
                        f"{run['decode_s'] * 1000:.0f}",
                        f"{run['peak_gib']:.1f}",
                        f"{sum(result['warmup_s'].values()):.1f}",
                    ]
                )
        header = [
            "tier",
            "batch",
            "s/image",
            "vs eager",
            "ms/step",
            "text + 1st step ms",
            "decode ms",
            "peak GiB",
            "warm-up (compile) s",
        ]
        blocks.append(f"**{title}** (random weights, 1024²)\n\n" + table(header, rows))
    return "\n\n".join(blocks)


# The benchmark's runs on the code as it ships (the AdaLN tables in), in the order they ran: the first also
# measured one one-GPU worker, the throughput baseline.
PARALLEL_RUNS = ("h200x2-parallel-tables.json", "h200x2-parallel-tables-repeat.json")


def parallel() -> str:
    rows = []
    for name in PARALLEL_RUNS:
        data = load_json(name)
        rows += [parallel_row(data["env"]["date"].split()[1], run) for run in data["runs"]]
    header = [
        "run (UTC)",
        "PARALLEL",
        "PARALLEL_ATTENTION",
        "CUDA_GRAPHS",
        "PARALLEL_DECODE",
        "workers",
        "lone request p50 ms",
        "× PARALLEL=1 (2 workers)",
        "denoise ms (text encoders + 28 steps)",
        "decode ms",
        "WebP encode ms (noise)",
        "closed loop images/s",
        "× PARALLEL=1 (2 workers)",
        "× one worker",
        "cold start s",
        "failures",
    ]
    return table(header, rows)


def parallel_row(started: str, run: dict[str, Any]) -> list[str]:
    step_ms = (run["lone_denoise_p50_ms"]) / run["steps"]
    graphs = "-" if run["parallel"] == 1 else run.get("cuda_graphs", "auto")
    return [
        started,
        str(run["parallel"]),
        run.get("attention") or "-",
        graphs,
        run.get("parallel_decode") or "-",
        str(run.get("worker_count", len(run["workers"]))),
        f"{run['lone_p50_ms']:.0f}",
        f"{run['lone_vs_parallel1']:.3f}×",
        f"{run['lone_denoise_p50_ms']:.0f} (≈ {step_ms:.0f} a step)",
        f"{run['lone_decode_p50_ms']:.0f}",
        f"{run['lone_encode_p50_ms']:.0f}",
        f"{run['closed_loop']['images_per_s']:.3f}",
        f"{run['throughput_vs_parallel1']:.2f}×",
        f"{run['throughput_vs_one_worker']:.2f}×" if run.get("throughput_vs_one_worker") else "–",
        f"{run['all_ready_s']:.0f}",
        str(run["lone_failures"] + run["closed_loop"]["failures"]),
    ]


def split_decode() -> str:
    data = load_json("h200x2-split-decode.json")
    results = data["results"]
    whole = results["whole"]["median_ms"]
    rows = [
        [
            variant,
            f"{result['median_ms']:.1f}",
            f"{result['min_ms']:.1f}",
            f"{result['median_ms'] / whole:.2f}×",
            str(result["max_levels_from_first"]),
            f"{result['mean_levels_from_first']:.2f}",
        ]
        for variant, result in results.items()
    ]
    header = ["variant", "decode median ms", "min ms", "× whole", "max levels from whole", "mean levels"]
    return table(header, rows)


def reclassified(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Kernel time by kind, with the kinds of gpu_parallel_profile.py's `kind_of` as it is now: outputs from
    before it knew ulysses-p2p counted its signal kernels as "other" and the norm/rotary kernels inductor
    names after its operator as "attention" (moved from the listed kernels, which hold all of them)."""
    from gpu_parallel_profile import kind_of

    kinds = {run: dict(by_kind) for run, by_kind in data["device_ms_per_step_by_kind"].items()}
    for name, listed, *times in data["kernels"]:
        now = kind_of(name)
        if now == listed:
            continue
        for run, ms in zip(("one_device", "share", "group"), times[0::2], strict=True):
            kinds[run][listed] = kinds[run].get(listed, 0.0) - ms
            kinds[run][now] = kinds[run].get(now, 0.0) + ms
    return kinds


def parallel_profile() -> str:
    data = load_json("h200x2-parallel-profile.json")
    kinds = reclassified(data)
    one, share, group = kinds["one_device"], kinds["share"], kinds["group"]
    ranks = data["ranks"]
    # Outputs from before the profile recorded it ran with the then default, the stacked exchange.
    attention = data.get("attention", "ulysses")
    rows = []
    for kind in ("matmul", "attention", "other", "collective"):
        alone = one.get(kind, 0.0)
        rows.append(
            [
                kind,
                f"{alone:.1f}",
                f"{alone / ranks:.1f}",
                f"{share.get(kind, 0.0):.1f}",
                f"{group.get(kind, 0.0):.1f}",
            ]
        )
    busy = data["device_busy_ms_per_step"]
    compute = {k: busy[k] - kinds[k].get("collective", 0.0) for k in busy}
    rows.append(
        [
            "all but collectives",
            f"{compute['one_device']:.1f}",
            f"{compute['one_device'] / ranks:.1f}",
            f"{compute['share']:.1f}",
            f"{compute['group']:.1f}",
        ]
    )
    # The share alone does 1/ranks² of the image's attention, a rank of the group 1/ranks: swap it for that.
    ideal = compute["share"] - share.get("attention", 0.0) + one.get("attention", 0.0) / ranks
    intro = (
        f"Rank 0, {data['steps']} steps profiled, `PARALLEL_ATTENTION={attention}`, kernel time per step "
        "by kind (the kernels the profiler lists; kinds by kernel name). Steps in this run, without CUDA "
        f"graphs and with a synchronisation at every step's end: one GPU {data['one_device_step_ms']:.1f} ms, "
        f"the group {data['group_step_ms']:.1f} ms. A rank's share alone with the group's attention "
        f"(1/{ranks} of one GPU's) instead of its own: **{ideal:.1f} ms** of kernels a step.\n\n"
    )
    header = [
        "kernels",
        "one GPU ms",
        f"1/{ranks} of it",
        "a rank's share alone ms",
        "one rank of the group ms",
    ]
    return intro + table(header, rows)


def edits() -> str:
    data = load_json("h200-edits.json")
    cases = data["cases"]
    base = cases["generate"]["median_ms"]
    rows = []
    for name, case in cases.items():
        previews = case["previews"]
        extra = case["median_ms"] - base
        each = f"{extra / previews:+.1f}" if previews else "–"
        rows.append(
            [name, f"{case['median_ms']:.1f}", f"{case['median_ms'] / base:.2f}×", str(previews), each]
        )
    v = data["versions"]
    intro = (
        f"{v['gpu']}, {v['date']}, torch {v['torch']}, diffusers {v['diffusers']}; {data['model']} "
        f"(random weights), tier {data['tier']}, {data['size']}², batch {data['batch']}, {data['steps']} steps; "
        "device time of the engine's compute part (denoise, decode, uint8 pixels in host memory), median of "
        f"{len(cases['generate']['runs_ms'])} runs.\n\n"
    )
    header = ["case", "device ms", "× generate", "previews", "ms per preview"]
    return intro + table(header, rows)


# benchmarks/gpu_parallel_comm.py's variants, by the PARALLEL_ATTENTION value each runs.
COMM_VARIANTS = {
    "ulysses": "ulysses-diffusers",
    "fused": "ulysses",
    "ring": "ring",
    "fused-overlap": "ulysses + inductor overlap",
    "ring-overlap": "ring + inductor overlap",
    "fused-graphs": "ulysses + CUDA graphs",
    "ring-graphs": "ring + CUDA graphs",
    "fused-chunks2-graphs": "ulysses in 2 head shares + CUDA graphs (not kept)",
    "fused-chunks4-graphs": "ulysses in 4 head shares + CUDA graphs (not kept)",
    "ulysses-graphs": "ulysses-diffusers + CUDA graphs",
    "fused-overlap-graphs": "ulysses + CUDA graphs + inductor overlap",
    "ulysses-overlap-graphs": "ulysses-diffusers + CUDA graphs + inductor overlap",
    "ring-overlap-graphs": "ring + CUDA graphs + inductor overlap",
}
# ulysses-p2p rows by how their exchange ran: runs 9 and 10 before their output recorded it.
P2P_TRANSPORTS = {"kernel": "copy kernels", "copy-engine": "copy engine"}
P2P_UNRECORDED = {
    "h200x2-parallel-comm-run9.json": "2-byte copy kernels in the compute stream",
    "h200x2-parallel-comm-run10.json": "16-byte copy kernels in the compute stream",
}
COMM_RUNS = (
    "h200x2-parallel-comm-run1.json",
    "h200x2-parallel-comm-run2.json",
    "h200x2-parallel-comm-run3.json",
    "h200x2-parallel-comm-run4.json",
    "h200x2-parallel-comm-run5.json",
    "h200x2-parallel-comm-run6.json",
    "h200x2-parallel-comm-run7.json",
    "h200x2-parallel-comm-run8.json",
    "h200x2-parallel-comm-run9.json",
    "h200x2-parallel-comm-run10.json",
    "h200x2-parallel-comm-run11.json",
    "h200x2-parallel-comm-run12.json",
    "h200x2-parallel-comm-run13.json",
    "h200x2-parallel-comm-run14.json",
    "h200x2-parallel-comm-run15.json",
    "h200x2-parallel-comm-run16.json",
    "h200x2-parallel-comm-run17.json",
    "h200x2-parallel-comm-run18.json",
)
# Runs that compared FLUX's AdaLN modulation from per-call tables with the products made at each step (all
# runs before computed them at each step); run 17 filled the tables eagerly, run 18 as a CUDA graph.
MODULATION_RUNS = {
    "h200x2-parallel-comm-run17.json": "AdaLN tables filled eagerly",
    "h200x2-parallel-comm-run18.json": "AdaLN tables",
}
RING_MERGES = {"traced": "merge in traced code", "kernel": "merge kernel"}
# ring-p2p rows of the runs whose attention stream waited for the peers' K and V with a signal kernel of its
# own (since run 14 the side stream waits and the attention stream waits on its event).
RING_P2P_WAIT_IN_ATTENTION_STREAM = {"h200x2-parallel-comm-run12.json", "h200x2-parallel-comm-run13.json"}


def comm_label(variant: str, result: dict[str, Any], run: str = "") -> str:
    if variant.startswith("p2p"):
        p2p = result.get("p2p")
        if p2p:
            chunks = "one chunk" if p2p["chunks"] == 1 else f"{p2p['chunks']} chunks of heads"
            how = f"{P2P_TRANSPORTS.get(p2p['transport'], p2p['transport'])} beside it, {chunks}"
        else:
            how = P2P_UNRECORDED.get(run, "?")
        return f"ulysses-p2p ({how})" + (" + CUDA graphs" if "graphs" in variant else "")
    if variant.startswith("ring-p2p"):
        ring = result.get("ring_p2p", {})
        streams = ring.get("streams", 1)
        how = [
            "cuDNN" if ring.get("kernel") == "cudnn" else "flash attention",
            "one copy stream" if streams == 1 else f"{streams} copy streams",
        ]
        if run in RING_P2P_WAIT_IN_ATTENTION_STREAM:
            how.append("waits in the attention stream")
        # Runs before 16 merged the partial attentions in traced code (they did not record it).
        how.append(RING_MERGES[ring.get("merge", "traced")])
        extra = " + inductor combo kernels" if "combo" in variant else ""
        return f"ring-p2p ({', '.join(how)})" + (" + CUDA graphs" if "graphs" in variant else "") + extra
    label = COMM_VARIANTS.get(variant, variant)
    if "overlap" in variant and not result.get("inductor_passes"):
        # Runs before the variants named inductor's passes set the flag alone, which runs none by default.
        label += " (flag only)"
    return label


def modulation_label(variant: str, run: str) -> str:
    if run not in MODULATION_RUNS:
        return ""
    return " + AdaLN per step" if "per-step-modulation" in variant else f" + {MODULATION_RUNS[run]}"


def one_gpu_rows(number: int, v: dict[str, Any], suffix: str) -> list[list[str]]:
    """A variant's timing of one GPU alone (before the split, under the variant's settings)."""
    one_gpu = v["one_device_call_ms"]
    rows = [[str(number), "one GPU" + suffix, f"{one_gpu:.0f}", "1.00×", "", "", "", "", "", ""]]
    if "one_device_graphs_call_ms" in v:
        graphed = v["one_device_graphs_call_ms"]
        enqueue = v["one_device_graphs_enqueue"]
        rows.append(
            [
                str(number),
                "one GPU + CUDA graphs" + suffix,
                f"{graphed:.0f}",
                f"{graphed / one_gpu:.2f}×",
                f"{v['one_device_graphs_step_ms']:.1f}",
                f"{enqueue['cpu_enqueue_ms']:.0f} / {enqueue['until_done_ms']:.0f}",
                "",
                "",
                "",
                "",
            ]
        )
    return rows


def parallel_comm() -> str:
    rows = []
    for number, name in enumerate(COMM_RUNS, start=1):
        data = load_json(name)
        variants = data["variants"]
        # Runs that skipped the one-GPU timing (--no-one-device) have no baseline of their own; runs with
        # --one-device-each have one per variant, the others one, in the first variant.
        each = bool(data["args"].get("one_device_each"))
        first = next((v for v in variants.values() if "one_device_call_ms" in v), {})
        if first and not each:
            rows += one_gpu_rows(number, first, "")
        for variant, v in variants.items():
            suffix = modulation_label(variant, name)
            if each and "one_device_call_ms" in v:
                rows += one_gpu_rows(number, v, suffix)
            one_gpu = (v if each else first).get("one_device_call_ms")
            prof = v["profiled"]
            enqueue = v["group_enqueue"]
            rows.append(
                [
                    str(number),
                    comm_label(variant, v, name) + suffix,
                    f"{v['group_call_ms']:.0f}",
                    "–" if one_gpu is None else f"{v['group_call_ms'] / one_gpu:.2f}×",
                    f"{v['group_step_ms']:.1f}",
                    f"{enqueue['cpu_enqueue_ms']:.0f} / {enqueue['until_done_ms']:.0f}",
                    f"{prof['compute_ms_per_step']:.1f}",
                    f"{prof['comm_only_ms_per_step']:.1f}",
                    f"{prof['no_kernel_ms_per_step']:.1f}",
                    f"{prof['collectives_per_step']:.0f}",
                ]
            )
    header = [
        "run",
        "group attention",
        "28 steps ms",
        "× one GPU",
        "step ms",
        "CPU enqueue / done ms",
        "compute ms/step",
        "only collectives ms/step",
        "no kernel ms/step",
        "collectives/step",
    ]
    return table(header, rows)


# Run 16's kernels by what runs them: names, not gpu_parallel_profile's kinds, which count inductor's
# quantisation kernels (named after the _scaled_mm they feed) as matrix products.
KERNEL_SOURCES = (
    ("cuBLAS matrix products", ("nvjet", "xmma_gemm")),
    ("cuDNN attention", ("cudnn_generated",)),
    ("Triton (inductor's fused kernels, the merge)", ("triton_", "merge_pair_kernel")),
    ("peer signals", ("symmetric_memory",)),
)
OTHER_KERNELS = "the rest (PyTorch's own kernels)"


def kernel_source(name: str) -> str:
    for source, marks in KERNEL_SOURCES:
        if any(mark in name for mark in marks):
            return source
    return OTHER_KERNELS


def graphed_kernels() -> str:
    """Run 16's profiled calls with CUDA graphs, one GPU and the group's variants: the listed kernels' time
    per step by what runs them."""
    data = load_json("h200x2-parallel-comm-run16.json")
    variants = data["variants"]
    first = next(iter(variants.values()))
    calls = {"one GPU + CUDA graphs": first["one_device_graphs_profiled"]}
    calls |= {comm_label(name, v): v["profiled"] for name, v in variants.items()}
    sources = [source for source, _ in KERNEL_SOURCES] + [OTHER_KERNELS]
    rows = []
    for label, profiled in calls.items():
        by_source = dict.fromkeys(sources, 0.0)
        for kernel in profiled["top_kernels"]:
            by_source[kernel_source(kernel["name"])] += kernel["ms_per_step"]
        rows.append(
            [label]
            + [f"{by_source[source]:.1f}" for source in sources]
            + [f"{profiled['compute_ms_per_step']:.1f}", f"{profiled['kernels_per_step']:.0f}"]
        )
    header = [
        "call",
        *(f"{source} ms/step" for source in sources),
        "some kernel runs ms/step",
        "kernels/step",
    ]
    listed = len(first["one_device_graphs_profiled"]["top_kernels"])
    intro = f"Run 16, the {listed} largest kernels of each profiled call, per step:\n\n"
    return intro + table(header, rows)


def parallel_collectives() -> str:
    rows = []

    def us(result: dict[str, Any], key: str) -> str:
        return f"{result[key]:.0f}" if key in result else "–"

    for number, name in enumerate(COMM_RUNS, start=1):
        for result in load_json(name)["collectives"].values():
            env = " ".join(f"{k}={v}" for k, v in result["env"].items()) or "(NCCL's defaults)"
            # Run 9 timed ulysses-p2p's exchange with 2-byte copies under a key of its own.
            kernels = result.get("p2p_exchange_kernel_graph_us", result.get("p2p_exchange_graph_us"))
            rows.append(
                [
                    str(number),
                    env,
                    us(result, "all_to_all_q_us"),
                    us(result, "all_to_all_qkv_us"),
                    us(result, "all_gather_kv_us"),
                    us(result, "nccl_exchange_graph_us"),
                    "–" if kernels is None else f"{kernels:.0f}",
                    us(result, "p2p_exchange_engine_graph_us"),
                ]
            )
    header = [
        "run",
        "NCCL setting",
        "all-to-all of Q µs",
        "all-to-all of Q, K, V µs",
        "all-gather of K, V µs",
        "a block's two all-to-alls, graphed µs",
        "a block's two p2p exchanges, copy kernels µs",
        "the same, copy engine µs",
    ]
    return table(header, rows)


def comm_order() -> str:
    data = load_json("cpu-comm-order.json")
    rows = [[name, " → ".join(result["order"])] for name, result in data["configs"].items()]
    return f"torch {data['torch']}:\n\n" + table(
        ["inductor configuration", "order in the generated code"], rows
    )


def modulation_check() -> str:
    data = load_json("h200-modulation-check.json")
    rows = [
        [
            call["prompt"],
            str(call["steps"]),
            str(call["max"]),
            f"{call['mean']:.2f}",
            str(call["max_tables_without_graphs"]),
        ]
        for call in data["calls"]
    ]
    header = [
        "prompt",
        "steps",
        "max levels from per-step",
        "mean levels",
        "max levels, tables with graphs from without",
    ]
    compared = data["rows"]
    return table(header, rows) + (
        f"\n\nThe last call's table against the same products made one row at a time: "
        f"{compared['differing']} of {compared['compared']} rows differ (at most {compared['max_abs']:g}). "
        f"Denoiser calls served from the tables: {data['lookups']}, computed for themselves: "
        f"{data['computed']}; fills held as CUDA graphs: {data['fill_graphs']}; denoiser graph replays: "
        f"{data['replays']}."
    )


BLOCKS: dict[str, Callable[[], str]] = {
    "serving-tax": serving_tax,
    "serving-throughput": serving_throughput,
    "serving-start": serving_start,
    "encoders": encoders,
    "tiers": tiers,
    "parallel": parallel,
    "split-decode": split_decode,
    "parallel-profile": parallel_profile,
    "edits": edits,
    "parallel-comm": parallel_comm,
    "graphed-kernels": graphed_kernels,
    "modulation-check": modulation_check,
    "parallel-collectives": parallel_collectives,
    "comm-order": comm_order,
}


def render(page: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(
            rf"(<!-- BEGIN generated: {re.escape(name)} -->\n).*?(<!-- END generated: {re.escape(name)} -->)",
            re.S,
        )
        if not pattern.search(page):
            raise SystemExit(f"{PAGE}: no generated block named {name!r}")
        text = make()
        page = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), page)
    return page


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the page is not what the raw outputs give"
    )
    args = parser.parse_args()
    current = PAGE.read_text()
    wanted = render(current)
    if args.check:
        if current != wanted:
            print(f"{PAGE} is out of date with docs/bench/: run python benchmarks/tables.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
