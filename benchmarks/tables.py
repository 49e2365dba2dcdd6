"""The tables of docs/benchmarks.md (and of the pages PAGE_OF names), generated from the raw outputs under
docs/bench/ (never retyped).

    python benchmarks/tables.py           # rewrite the generated blocks of docs/benchmarks.md
    python benchmarks/tables.py --check   # exit 1 when the page and the raw outputs disagree (`make lint`)

Each block sits between `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->`; BLOCKS names the
raw file behind each.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
PAGE = ROOT / "docs" / "benchmarks.md"


def load(name: str) -> Any:
    text = (BENCH / name).read_text()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_line(env: dict[str, Any]) -> str:
    """The card, software and date of a run, from its raw output."""
    where = env["gpu"] if env.get("gpu", "none") != "none" else f"{env.get('cpu_count')} CPU cores"
    software = f"torch {env['torch']}, diffusers {env['diffusers']}"
    if env.get("torchao", "absent") != "absent":
        software += f", torchao {env['torchao']}"
    return f"{where}; {software}, Python {env['python']}; {env['date']}; code {env['commit']}."


def cpu_digits(name: str) -> str:
    data = load(name)
    rows = [
        [
            str(t["threads"]),
            f"{t['one_median_ms']:.1f}",
            f"{t['one_p90_ms']:.1f}",
            f"{t['eight_median_ms']:.1f}",
            f"{t['eight_median_ms'] / 8:.1f}",
            f"{t['eight_median_ms'] / t['one_median_ms']:.2f}×",
            f"{t['load_before']:.1f} → {t['load_after']:.1f}",
        ]
        for t in data["timing"]
    ]
    header = ["threads", "1 image ms (median)", "p90", "batch of 8 ms", "per image", "8 / 1", "load average"]
    accuracy = [[str(a["steps"]), f"{a['images']}", f"{100 * a['accuracy']:.1f} %"] for a in data["accuracy"]]
    return (
        run_line(data["environment"])
        + "\n\n"
        + table(header, rows)
        + "\n\n"
        + table(["steps", "images", "prompt-following accuracy"], accuracy)
    )


def cpu_sweep(name: str) -> str:
    data = load(name)
    client, server = [], []
    for step in data["steps"]:
        latency = step["latency_ms"]
        client.append(
            [
                str(step["users"]),
                str(step["requests"]),
                str(step["failures"]),
                f"{latency['p50']:.1f}",
                f"{latency['p90']:.1f}",
                f"{latency['p99']:.1f}",
                f"{step['images_per_s']:.2f}",
                f"{step['overhead_ms']['p50']:.1f}",
            ]
        )
        seen = step["server"]
        sizes = ", ".join(f"{size}: {count}" for size, count in sorted(seen["batch_size_buckets"].items()))
        server.append(
            [
                str(step["users"]),
                str(seen["batches"]),
                f"{seen['mean_batch_size']:.2f}",
                sizes,
                f"{seen['mean_queue_ms']:.1f}",
                f"{seen['mean_inference_ms']:.1f}",
            ]
        )
    versions = data["versions"]
    intro = (
        f"{data['model']}; {data['machine']}; diffuserve {versions['diffuserve']}, torch {versions['torch']}, "
        f"locust {versions['locust']}, code {versions['git']}; {data['created']}."
    )
    return (
        intro
        + "\n\n"
        + table(
            ["users", "requests", "failures", "p50 ms", "p90 ms", "p99 ms", "images/s", "overhead p50 ms"],
            client,
        )
        + "\n\nThe server's view (`/metrics` before and after each step):\n\n"
        + table(
            ["users", "batches", "mean batch", "batch sizes (size: batches)", "queue ms", "inference ms"],
            server,
        )
    )


def tiers(*names: str) -> str:
    """Per model: each tier's pipeline call (median of its runs) against tier E, plain diffusers eager."""
    out = []
    for name in names:
        results = load(name)
        eager = {r["batch"]: r for r in _medians(results, "E")}
        rows = []
        order = ["E", "XL", "L", "M", "S"]
        # The tiers in their order, then the peers (other projects' recipes measured in the same run).
        rank = {tier: index for index, tier in enumerate(order)}
        named = sorted(
            {r["tier"] for r in results if "runs" in r},
            key=lambda t: (rank.get(t.split("/")[0], len(order)), t),
        )
        for result in [[r for r in results if r["tier"] == tier and "runs" in r][-1] for tier in named]:
            for run in _medians(results, result["tier"]):
                base = eager.get(run["batch"])
                speed = f"{base['s'] / run['s']:.2f}×" if base and result["tier"] != "E" else "-"
                label = "E (plain diffusers, eager)" if result["tier"] == "E" else result["tier"]
                if result.get("peer"):
                    label = f"peer: {result['peer']} {result.get('peer_version', '')}".rstrip()
                rows.append(
                    [
                        label,
                        str(run["batch"]),
                        f"{run['s'] / run['batch']:.3f}",
                        speed,
                        f"{run['ms_per_step']:.1f}",
                        f"{run['first_step_ms']:.0f}",
                        f"{run['decode_ms']:.0f}",
                        f"{run['peak_gib']:.1f}",
                        f"{result.get(warmup_key(run['batch']), float('nan')):.1f}",
                        psnr_vs_eager(result),
                    ]
                )
        first = results[0]
        head = f"**{first['model']}, {first['steps']} steps, {first['size']}²**: {run_line(first['environment'])}"
        header = [
            "tier",
            "batch",
            "s/image",
            "vs E",
            "ms/step",
            "text + 1st step ms",
            "decode ms",
            "peak GiB",
        ]
        header.append("warm-up s")
        # Runs from before the PSNR was recorded get no column of dashes.
        if any("psnr_vs_eager_db" in r for r in results):
            header.append("PSNR vs E")
        else:
            rows = [row[:-1] for row in rows]
        out.append(head + "\n\n" + table(header, rows))
    return "\n\n".join(out)


def psnr_vs_eager(result: dict[str, Any]) -> str:
    """The first image's PSNR against tier E's (same prompt and seed), where the run recorded it: null is the
    same image."""
    if result["tier"] == "E" or "psnr_vs_eager_db" not in result:
        return "-"
    psnr = result["psnr_vs_eager_db"]
    if isinstance(psnr, str):  # the image was not finite
        return psnr
    return "identical" if psnr is None else f"{psnr:.1f} dB"


def families(*names: str) -> str:
    """One row per model family: its denoiser's size, and each tier's step against eager E of the same run."""
    rows = []
    envs: set[tuple[str, str]] = set()
    for name in names:
        results = load(name)
        # Batch 1 of each tier that ran (a failed tier's row has no runs).
        medians = {r["tier"]: _medians(results, r["tier"])[0] for r in results if "runs" in r}
        first = results[0]
        where, software, date = run_line(first["environment"]).split("; ")[:3]
        envs.add((f"{where}; {software}", date))
        params = first.get("params", {})  # runs before the benchmark recorded parameter counts have none
        denoiser = params.get("transformer") or params.get("unet")
        eager = medians["E"]

        def step(tier: str, eager: dict[str, float] = eager, medians: dict = medians) -> str:
            run = medians.get(tier)
            if run is None:
                return "-"
            if tier == "E":
                return f"{run['ms_per_step']:.0f}"
            return f"{run['ms_per_step']:.0f} ({eager['ms_per_step'] / run['ms_per_step']:.2f}×)"

        peaks = "/".join(f"{medians[t]['peak_gib']:.0f}" for t in ("E", "L") if t in medians)
        rows.append(
            [
                first["model"],
                f"{denoiser / 1e9:.2f} B" if denoiser else "-",
                step("E"),
                step("XL"),
                step("L"),
                f"{eager['first_step_ms']:.0f}",
                f"{eager['decode_ms']:.0f}",
                peaks,
            ]
        )
    header = [
        "family",
        "denoiser",
        "E ms/step",
        "XL ms/step (vs E)",
        "L ms/step (vs E)",
        "text + 1st step ms (E)",
    ]
    header += ["decode ms (E)", "peak GiB E/L"]
    setups = sorted({setup for setup, _ in envs})
    dates = ", ".join(sorted(date for _, date in envs))
    return f"{' · '.join(setups)}; runs of {dates}.\n\n" + table(header, rows)


def warmup_key(batch: float) -> str:
    return f"warmup_b{int(batch)}_s"


def _medians(results: list[dict[str, Any]], tier: str) -> list[dict[str, float]]:
    """A tier's runs, as the median of each measure per batch size (its last result where a tier repeats)."""
    result = [r for r in results if r["tier"] == tier and "runs" in r][-1]
    batches = sorted({run["batch"] for run in result["runs"]})
    keys = ("s", "ms_per_step", "first_step_ms", "decode_ms", "peak_gib")
    return [
        {"batch": b, **{k: median([run[k] for run in result["runs"] if run["batch"] == b]) for k in keys}}
        for b in batches
    ]


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def digits_quality(name: str) -> str:
    """The tiers as they ship (their default settings), against eager in bf16 and float32."""
    return _digits_quality(name, lambda tier: "FP8_ROUNDING" not in tier)


def digits_quality_rounding(name: str) -> str:
    """Tier L with each FP8_ROUNDING, from the same run (the page that explains the setting shows it)."""
    return _digits_quality(name, lambda tier: tier.startswith("L"))


def _digits_quality(name: str, wanted: Callable[[str], bool]) -> str:
    data = load(name)
    rows = [
        [
            row["tier"].replace("/", ", "),
            str(row["steps"]),
            f"{100 * row['accuracy']:.0f} %",
            f"{row['reused_steps_per_image']:.1f}",
            percent(row.get("rel_err_vs_E/float32")),
            percent(row.get("rel_err_vs_E")),
        ]
        for row in sorted(data["rows"], key=lambda r: r["steps"])
        if wanted(row["tier"])
    ]
    header = ["tier", "steps", "accuracy", "reused steps/image", "error vs E fp32", "error vs E bf16"]
    return run_line(data["environment"]) + "\n\n" + table(header, rows)


def fp8_error(name: str) -> str:
    """cpu_fp8_error.py, tier L's rows: every layer rounded, by rounding, weights or activations alone."""
    return fp8_error_table(name, lambda variant: variant.startswith("tier L"), "fp8 rounding in")


def fp8_error_layers(name: str) -> str:
    """cpu_fp8_error.py, one kind of layer rounded at a time (its name with the block index as N)."""
    return fp8_error_table(
        name, lambda variant: not variant.startswith("tier L"), "only these layers rounded"
    )


def fp8_error_table(name: str, wanted: Callable[[str], bool], first: str) -> str:
    """Distance from bf16 eager per group of emulated fp8 linears, one column per step count."""
    data = load(name)
    steps = sorted({row["steps"] for row in data["rows"]})
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for row in data["rows"]:
        if wanted(row["variant"]):
            by_variant.setdefault(row["variant"], {})[row["steps"]] = row
    rows = [
        [
            variant,
            str(next(iter(cells.values()))["layers"]),
            *(percent(cells[s]["rel_err_vs_E"]) if s in cells else "–" for s in steps),
        ]
        for variant, cells in by_variant.items()
    ]
    header = [first, "layers", *(f"error vs E bf16, {s} steps" for s in steps)]
    intro = f"{data['prompts']} prompts, the same seeds; {run_line(data['environment'])}"
    return intro + "\n\n" + table(header, rows)


def encoders(name: str) -> str:
    data = load(name)
    labels = {
        "webp_m0": "WebP effort 0 (served)",
        "webp_m2": "WebP effort 2",
        "png_pillow_l1": "PNG, Pillow zlib 1",
        "png_diffuserve_1core": "PNG, diffuserve, one core",
        "png_diffuserve_pool8": "PNG, diffuserve, 8 pieces (served)",
        "jpeg_pillow_q90": "JPEG q90, Pillow (CPU fallback)",
        "jpeg_nvjpeg": "JPEG q90, nvJPEG on the GPU (served on CUDA)",
    }
    enc = data["encoders"]
    rows = [
        [
            label,
            f"{enc['photo'][key]['ms']:.1f}",
            f"{enc['photo'][key]['bytes'] / 1e3:.0f}",
            f"{enc['noise'][key]['ms']:.1f}",
            f"{enc['noise'][key]['bytes'] / 1e3:.0f}",
        ]
        for key, label in labels.items()
        if key in enc["photo"]
    ]
    nv = data.get("nvjpeg")
    note = ""
    if nv:
        note = (
            f"\n\nnvJPEG: {nv['iterations']} encodes of the same pixels with other CUDA streams busy, "
            f"{nv['byte_mismatches_vs_first']} byte mismatches; PSNR against the source {nv['psnr_gpu_db'][0]:.1f} "
            f"dB (Pillow's JPEG at the same quality: {nv['psnr_cpu_db'][0]:.1f} dB)."
        )
    header = ["encoder (1024², one image)", "photo ms", "photo KB", "noise ms", "noise KB"]
    return table(header, rows) + note


def parallel_group(name: str) -> str:
    """The worker group's rows of a gpu_parallel.py run (its one-GPU rows ran without CUDA graphs, which
    one-GPU workers no longer do, so they are left out)."""
    data = load(name)
    env = data.get("environment") or data["env"]  # older raw outputs name it "env"
    rows = [
        [
            f"{run['parallel']} × {env['gpu']}",
            f"{run['attention']} ({run['cuda_graphs']} graphs, decode {run['parallel_decode']})",
            f"{run['lone_p50_ms']:.0f}",
            f"{run['lone_denoise_p50_ms']:.0f} (≈ {run['lone_denoise_p50_ms'] / run['steps']:.0f} a step)",
            f"{run['lone_decode_p50_ms']:.0f}",
            f"{run['lone_encode_p50_ms']:.0f}",
            f"{run['closed_loop']['images_per_s']:.3f}",
            f"{run['all_ready_s']:.0f}",
            str(run["lone_failures"] + run["closed_loop"]["failures"]),
        ]
        for run in data["runs"]
        if run["parallel"] > 1
    ]
    header = [
        "group",
        "PARALLEL_ATTENTION",
        "lone request p50 ms",
        "denoise ms",
        "decode ms",
        "WebP encode ms",
    ]
    intro = (
        f"{env['date']}, torch {env['torch']}, diffusers {env['diffusers']}, Python {env['python']}, code "
        f"{env.get('commit', env.get('git'))}; random FLUX.1-dev, tier {data['args']['tier']}, {data['args']['size']}², "
        f"{data['runs'][0]['steps']} steps, `MODEL_BATCH=1`."
    )
    return intro + "\n\n" + table([*header, "images/s, 16 users", "cold start s", "failures"], rows)


def split_decode(name: str) -> str:
    results = load(name)["results"]
    whole = results["whole"]["median_ms"]
    rows = [
        [
            variant,
            f"{results[variant]['median_ms']:.1f}",
            f"{results[variant]['min_ms']:.1f}",
            f"{results[variant]['median_ms'] / whole:.2f}×",
            str(results[variant]["max_levels_from_first"]),
            f"{results[variant]['mean_levels_from_first']:.2f}",
        ]
        for variant in ("whole", "joint")
    ]
    header = ["decode", "median ms", "min ms", "× whole", "max levels from whole", "mean levels"]
    return table(header, rows)


def loras(name: str) -> str:
    """Adapters per request (gpu_lora.py): diffuserve with adapters off and on at each tier, and diffusers'
    compiled hotswap, from one run's rows."""
    rows = []
    for row in load(name):
        lone, loop = row["lone_s"], row.get("closed_loop", {})
        hotswap = row["tier"] == "diffusers-hotswap"
        setup = (
            "diffusers + compile, hotswap"
            if hotswap
            else f"diffuserve {row['tier']}, adapters {row['adapters']}"
        )
        swap = row.get("swap_s") if hotswap else [ms / 1000 for ms in row.get("swap_ms", [])]
        rows.append(
            [
                setup,
                " / ".join(
                    f"{lone[k]:.3f}" if k in lone else "—" for k in ("no_adapter", "same_adapter", "swapping")
                ),
                f"{median(swap) * 1000:.0f} ms" if swap else "—",
                str(row["recompiles"]) if "recompiles" in row else "—",
                " / ".join(
                    f"{loop[k]['images_per_s']:.3f}" if k in loop else "—"
                    for k in ("no_adapter", "split", "mixed")
                ),
            ]
        )
    header = [
        "setup",
        "lone request, s: no adapter / adapter / alternating",
        "swap",
        "recompiles",
        "8 users, img/s: no adapter / 4 adapters split / mixed",
    ]
    first = load(name)[0]
    where = f"FLUX.1-dev, random weights, {first['size']}², {first['steps']} steps. "
    return table(header, rows) + "\n\n" + where + run_line(first["environment"])


# The families' tier runs, in the table's order (FLUX.1 first: the runs of the tiers block above).
FAMILY_RUNS = (
    "flux-dev",
    "flux-schnell",
    "flux-kontext",
    "flux2-klein",
    "sd35-large",
    "sd35-medium",
    "qwen-image",
    "qwen-image-edit",
    "z-image-turbo",
    "sdxl",
)


# Each block: the function that makes it and the raw file(s) under docs/bench/ it reads.
def priorities(*names: str) -> str:
    """Interactive latency behind a backlog of batch jobs, per schedule, one table per run."""
    labels = {
        "priorities": "priorities + preemption (default)",
        "no-preemption": "priorities, `PREEMPT=false`",
        "fifo": "one class (first come, first served)",
    }
    parts = []
    for name in names:
        data = load(name)
        job = ", ".join(f"{k} {v}" for k, v in data["job"].items())
        rows = [
            [
                labels[row["schedule"]],
                f"{row['idle_p95_s'] * 1000:.0f}",
                f"{row['loaded_p50_s'] * 1000:.0f}",
                f"{row['loaded_p95_s'] * 1000:.0f}",
                f"**{row['p95_ratio']:.1f}×**",
                f"{row['jobs_succeeded']}/{data['jobs']} in {row['backlog_s']:.1f} s",
                str(row["preempted_requests"]),
            ]
            for row in data["schedules"]
        ]
        parts.append(
            f"{data['model']} on {data['devices']} (tier {data['tier']}, MODEL_BATCH {data['batch']}): "
            f"{data['jobs']} batch jobs of {job}; one interactive request a second, {data['requests']} of them. "
            + run_line(data["environment"])
            + "\n\n"
            + table(
                [
                    "schedule",
                    "idle p95 (ms)",
                    "loaded p50 (ms)",
                    "loaded p95 (ms)",
                    "p95 loaded / idle",
                    "batch jobs done",
                    "preempted",
                ],
                rows,
            )
        )
    return "\n\n".join(parts)


# The start-up goals (warm: to the first image, and to every batch size warm; cold: to the first image).
STARTUP_GOALS_S = {"warm": 10.0, "warm_all": 15.0, "cold": 45.0}
STARTUP_PHASES = ("spawn", "import", "load", "tier")


def startup(*names: str) -> str:
    """Cold and warm starts per model, timed from the spawn, with the worker's phases, one table per run."""
    parts = []
    for name in names:
        data = load(name)
        if "pipeline_diffuserve_load" in data:
            parts.append(weights_read(data))
            continue
        settings = data["settings"]
        for model in data["models"]:
            if "error" in model:
                parts.append(f"{model['repo']}: failed ({model['error']})")
                continue
            parts.append(_startup_model(model, settings, data["environment"]))
        parts += [line for line in (startup_imports(data), startup_bytecode(data)) if line]
    return "\n\n".join(parts)


def _startup_model(model: dict[str, Any], settings: dict[str, Any], env: dict[str, Any]) -> str:
    folder, disk = model["folder"], model.get("disk", {})
    gigabytes = folder["bytes"] / 1e9
    rows = []
    for run in model["runs"]:
        worker = run["workers"][0] if run.get("workers") else {}
        phases = worker.get("start_seconds", {})
        load_s, early_s = phases.get("load", 0.0), phases.get("early_read")
        # Where the diffusers models were read beside the imports, the load phase moved only the rest.
        rate = f" ({gigabytes / load_s:.1f} GB/s)" if load_s else ""
        if early_s:
            rate = f" (+ {early_s:.1f} s read beside the imports)"
        warmups = {k.removeprefix("warmup_"): v for k, v in phases.items() if k.startswith("warmup_b")}
        first_goal = STARTUP_GOALS_S["cold" if run["run"] == "cold" else "warm"]
        first = run.get("first_image_s", float("nan"))
        all_warm = run.get("all_warm_s")
        rows.append(
            [
                run["run"],
                f"{run['ready_s']:.1f}",
                _against(first, first_goal),
                _against(all_warm, STARTUP_GOALS_S["warm_all"])
                if run["run"] == "warm"
                else _seconds(all_warm),
                *(f"{phases.get(p, 0.0):.1f}" + (rate if p == "load" else "") for p in STARTUP_PHASES),
                ", ".join(f"{size} {s:.1f}" for size, s in warmups.items()),
            ]
        )
    same = {True: "the same image (sha256) in every run", False: "**images differ between runs**", None: ""}
    differences = [run["image_vs_first"] for run in model["runs"] if run.get("image_vs_first")]
    if model.get("same_image") is False and differences:
        worst = lowest_psnr(differences)
        same[False] += (
            f" (largest pixel difference {worst.get('max_abs')} of 255, PSNR {worst.get('psnr_db')} dB)"
        )
    head = (
        f"{model['repo']} (random weights saved as a {gigabytes:.1f} GB diffusers folder), tier "
        f"{settings['tier']}, MODEL_BATCH {settings['batch']}; disk {disk.get('disk_gb_s', '?')} GB/s "
        f"({'O_DIRECT' if disk.get('o_direct') else 'evicted, buffered'}), page cache "
        f"{disk.get('page_cache_gb_s', '?')} GB/s; {same[model.get('same_image')]}. " + run_line(env)
    )
    header = [
        "start",
        "ready (s)",
        "first image (s)",
        "every size warm (s)",
        "spawn",
        "import",
        "load",
        "tier",
    ]
    return head + "\n\n" + table([*header, "warm-up per batch size (s)"], rows) + _lone_line(model)


def _lone_line(model: dict[str, Any]) -> str:
    """The lone requests over HTTP once every size was warm (the cold run's, the first that has them)."""
    lone = next((run["lone"] for run in model["runs"] if run.get("lone")), None)
    if not lone:
        return ""
    parts = []
    for name, label in (("same_prompt", "a repeated prompt"), ("new_prompt", "a new prompt each time")):
        seconds = lone.get(name, {}).get("seconds", [])
        if seconds:
            parts.append(f"{label} {median(seconds):.2f} s (median of {len(seconds)})")
    return (
        "\n\nLone requests over HTTP once every size was warm (JPEG, native size): " + ", ".join(parts) + "."
    )


def weights_read(data: dict[str, Any]) -> str:
    """`gpu_weights_read.py`: one folder's weights from the page cache to the GPU in one process, several ways."""

    def rate(key: str) -> str:
        return f"{data[key]['s']:.1f} s ({data[key]['gbps']:.1f} GB/s)"

    threads = [k.rsplit("_", 1)[1] for k in data if k.startswith("transformer_read_tensors_")]
    env = data.get("environment")
    where = (
        run_line(env)
        if env
        else "No environment recorded (the script's first version, which ran once: on an H100, torch 2.11.0+cu130, "
        "diffusers 0.42.1, Python 3.12.3, right after FLUX.1-schnell start-ups at code a567653 on that machine)."
    )
    return (
        "The same folder's weights from the page cache, in one process (`benchmarks/gpu_weights_read.py`): "
        f"the whole pipeline through diffusers' `from_pretrained` {rate('pipeline_diffusers_from_pretrained')}, "
        f"through the engine's loader {rate('pipeline_diffuserve_load')}. The transformer's "
        f"{sum(b for f, b in data['files'] if f.startswith('transformer/')) / 1e9:.1f} GB: safetensors' "
        f"`load_file` to CUDA {rate('transformer_load_file_seq')}; the engine's reader "
        + ", ".join(f"{n} threads {rate(f'transformer_read_tensors_{n}')}" for n in threads)
        + f" (every tensor equal to safetensors': {'yes' if data.get('read_tensors_equal') else 'no'}). "
        f"The T5 encoder alone through transformers {data.get('transformers', '')}: "
        f"{rate('t5_from_pretrained')}. " + where
    )


def startup_bytecode(data: dict[str, Any]) -> str:
    """Whether the imports were timed with the packages' bytecode in place, as a deployment's image has it."""
    bytecode = data.get("bytecode")
    if bytecode is None:
        return (
            "The script did not compile the packages' bytecode before this run: where the environment had "
            "none, every start's import phase includes compiling their sources."
        )
    return f"The packages' bytecode was compiled before any start ({bytecode['seconds']:.1f} s)."


def startup_imports(data: dict[str, Any]) -> str:
    """The imports a worker pays, each in a fresh interpreter, and the longest of them."""
    imports = data.get("imports") or {}
    if not imports:
        return ""
    timed = [
        f"{name} {seconds:.1f} s" for name, seconds in imports.items() if isinstance(seconds, float | int)
    ]
    profile = imports.get("worker_profile_s") or {}
    longest = ", ".join(f"`{name}` {seconds:.1f}" for name, seconds in list(profile.items())[:6])
    line = "Imports in fresh interpreters: " + ", ".join(timed) + "."
    return line + (
        f" A worker's longest imports (`-X importtime`, cumulative s): {longest}." if longest else ""
    )


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _against(value: float | None, goal: float) -> str:
    """A time beside its goal: bold where met, else by how much it is missed."""
    if value is None or value != value:
        return "–"
    if value <= goal:
        return f"**{value:.1f}** (≤ {goal:.0f})"
    return f"{value:.1f} ({value - goal:+.1f} over {goal:.0f})"


# step_profile.py's categories, in its order (tables.py runs as a script and is imported by the tests, so it
# names them rather than importing that module).
PROFILE_CATEGORIES = ("matmul", "attention", "norm/elementwise", "memcpy/memset")


def step_profile_table(rows: list[dict[str, Any]]) -> str:
    """One line per profiled tier: ms per denoising step (the call's per step where the markers are missing),
    split into categories, gaps and the busy share."""
    header = ["tier", "ms/step", "matmul", "attention", "norm/elementwise", "memcpy", "gaps", "busy %"]
    lines = []
    for row in rows:
        label = str(row.get("tier", "?"))
        if row.get("batch", 1) != 1:
            label += f" (batch {row['batch']})"
        summary = row.get("denoise") or row.get("call")
        if not summary:
            lines.append([label, "failed", *["-"] * (len(header) - 2)])
            continue
        cats, per = summary["categories"], summary["per_step"]
        busy = summary.get("busy_share")
        lines.append(
            [
                label,
                f"{per['wall_ms']:.1f}",
                *(f"{cats[name]['ms_per_step']:.1f}" for name in PROFILE_CATEGORIES),
                f"{per['gaps_ms']:.1f}",
                f"{100 * busy:.0f} %" if busy is not None else "-",
            ]
        )
    return table(header, lines)


def vae(*names: str) -> str:
    """`gpu_vae.py`: per run, each decode variant's time per shape against that run's eager, its first call and
    its pixels' distance from eager's."""
    return "\n\n".join(vae_run(load(name)) for name in names)


def vae_run(data: dict[str, Any]) -> str:
    """One `gpu_vae.py` run's table under its card, software and date."""
    shapes = list(data["shapes"])
    eager_row: dict[str, Any] = next((r for r in data["rows"] if r["variant"] == "eager"), {"shapes": {}})
    eager = {shape: result["ms"] for shape, result in eager_row["shapes"].items()}
    rows = []
    for row in data["rows"]:
        measured = row.get("shapes", {})
        cells = [row["variant"]]
        for shape in shapes:
            result = measured.get(shape)
            if result is None:
                cells.append("-")
                continue
            base = eager.get(shape)
            speed = f" ({base / result['ms']:.2f}×)" if base and row is not eager_row else ""
            cells.append(f"{result['ms']:.1f}{speed}")
        cells.append(", ".join(f"{r['first_call_s']:.1f}" for r in measured.values()) or "-")
        differences = [r["vs_eager"] for r in measured.values() if "vs_eager" in r]
        if "error" in row:
            cells.append("failed: " + row["error"].replace("|", "\\|"))
        elif not differences:
            cells.append("-")
        else:
            cells.append(_worst_difference(differences))
        rows.append(cells)
    header = ["decode", *(f"{shape} ms" for shape in shapes), "first call s", "pixels vs eager"]
    return run_line(data["environment"]) + "\n\n" + table(header, rows)


def lowest_psnr(differences: list[dict[str, Any]]) -> dict[str, Any]:
    """The image difference with the lowest PSNR (`psnr_db` None: the same image)."""
    return min(differences, key=lambda d: math.inf if d.get("psnr_db") is None else d["psnr_db"])


def _worst_difference(differences: list[dict[str, Any]]) -> str:
    """The largest of several image differences (`max_abs` of 255, `psnr_db`, None where equal)."""
    if all(d["max_abs"] == 0 for d in differences):
        return "identical"
    worst = lowest_psnr(differences)
    return f"PSNR {worst['psnr_db']:.1f} dB, largest {max(d['max_abs'] for d in differences)} of 255"


def attention(name: str) -> str:
    """`gpu_attention.py`: each kernel's time at each shape, against the first (torch's default choice, cuDNN)."""
    data = load(name)
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    parts = [run_line(data["environment"]) + (f" {versions}." if versions else "")]
    rows = []
    for shape_name, shape in data["shapes"].items():
        batch, heads, tokens, dim = shape["shape"]
        base = next((r["ms"] for r in shape["rows"] if "ms" in r), None)
        for row in shape["rows"]:
            if "ms" not in row:
                rows.append(
                    [
                        shape_name,
                        f"{batch}×{heads}×{tokens}×{dim}",
                        row["kernel"],
                        "–",
                        "–",
                        "–",
                        row["error"],
                    ]
                )
                continue
            ratio = f"{base / row['ms']:.2f}×" if base else "–"
            error = f"{100 * row['rel_err_vs_fp32']:.2f} %"
            rows.append(
                [
                    shape_name,
                    f"{batch}×{heads}×{tokens}×{dim}",
                    row["kernel"],
                    f"{row['ms']:.3f}",
                    f"{row['tflops']:.0f}",
                    ratio,
                    error,
                ]
            )
    header = ["shape", "B×H×L×D", "kernel", "ms", "TFLOP/s", "speed vs the first", "error vs float32"]
    parts.append(table(header, rows))
    missing = data.get("missing") or {}
    if missing:
        parts.append("Not measured: " + "; ".join(f"{k} ({v})" for k, v in missing.items()) + ".")
    return "\n\n".join(parts)


# What each table on another page sets its figures against, measured in the same run.
BASELINES = {
    "priorities": "the same interactive requests on an idle server; priorities without preemption",
    "startup": "the cold start (no compile artefacts, weights evicted) against the warm; the disk's own read rate",
    "fp8-error": "tier E in bf16, the same prompts and seeds",
    "digits-quality-rounding": "tier E in fp32 and in bf16, the same prompts and seeds",
    "fp8-error-layers": "tier E in bf16, the same prompts and seeds",
    "attention": "torch's default SDPA kernel (cuDNN) and a float32 reference, the same inputs",
    "vae": "the eager decode, the same latents",
    "peers": "plain diffusers eager (tier E), the same weights, prompt and seed",
}


def run_of(name: str) -> str:
    """The card, software, date and code of one raw output (a `.jsonl` run: its first row's)."""
    data = load(name)
    env = (data[0] if isinstance(data, list) else data).get("environment")
    return run_line(env) if env else "no environment recorded"


def elsewhere() -> str:
    """The tables that stand beside the feature they measure, each with its raw outputs' runs and baseline."""
    rows = []
    for name, page in PAGE_OF.items():
        link = f"[{name}]({page.relative_to(PAGE.parent).as_posix()})"
        runs = "<br>".join(f"`{file}`: {run_of(file)}" for file in BLOCKS[name][1])
        rows.append([link, runs, BASELINES[name]])
    return table(["table", "raw output: card, software, date, code", "baseline in the same run"], rows)


BLOCKS: dict[str, tuple[Callable[..., str], tuple[str, ...]]] = {
    "elsewhere": (elsewhere, ()),
    "attention": (attention, ("h100-attention.json",)),
    "cpu-digits": (cpu_digits, ("cpu-digits.json",)),
    "cpu-sweep": (cpu_sweep, ("cpu-sweep-summary.json",)),
    "tiers": (tiers, ("h100-tiers-flux-dev.jsonl", "h100-tiers-flux-schnell.jsonl")),
    "peers": (tiers, ("h100-tiers-flux-dev-peers.jsonl",)),
    "vae": (vae, ("h100-vae.json", "h100-vae-resnet-blocks.json")),
    "families": (families, tuple(f"h100-tiers-{name}.jsonl" for name in FAMILY_RUNS)),
    "digits-quality": (digits_quality, ("h100-digits-quality.json",)),
    "digits-quality-rounding": (digits_quality_rounding, ("h100-digits-quality.json",)),
    "fp8-error": (fp8_error, ("cpu-fp8-error.json",)),
    "fp8-error-layers": (fp8_error_layers, ("cpu-fp8-error.json",)),
    "encoders": (encoders, ("h200-profile.json",)),
    "parallel-group": (parallel_group, ("h200x2-parallel-tables.json",)),
    "split-decode": (split_decode, ("h200x2-split-decode.json",)),
    "loras": (loras, ("h100-lora-flux-dev.jsonl",)),
    "priorities": (priorities, ("cpu-priorities-digits.json",)),
    "startup": (
        startup,
        ("h100-startup-flux-schnell.json", "h100-weights-read.json", "h100-startup-flux-dev.json"),
    ),
}


# Blocks that live on another page than docs/benchmarks.md: beside the feature they measure.
PAGE_OF = {
    "priorities": ROOT / "docs" / "jobs.md",
    "startup": ROOT / "docs" / "startup.md",
    "fp8-error": ROOT / "docs" / "tiers.md",
    "digits-quality-rounding": ROOT / "docs" / "tiers.md",
    "fp8-error-layers": ROOT / "docs" / "design" / "tiers.md",
    "attention": ROOT / "docs" / "design" / "tiers.md",
    "vae": ROOT / "docs" / "design" / "serving.md",
    "peers": ROOT / "docs" / "design" / "tiers.md",
}


def render(path: Path, page: str) -> str:
    for name, (make, files) in BLOCKS.items():
        if PAGE_OF.get(name, PAGE) != path:
            continue
        pattern = re.compile(
            rf"(<!-- BEGIN generated: {re.escape(name)} -->\n).*?(<!-- END generated: {re.escape(name)} -->)",
            re.S,
        )
        if not pattern.search(page):
            raise SystemExit(f"{path}: no generated block named {name!r}")
        text = make(*files)
        page = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), page)
    return page


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a page is not what the raw outputs give"
    )
    args = parser.parse_args()
    stale = []
    for path in sorted({PAGE, *PAGE_OF.values()}):
        current = path.read_text()
        wanted = render(path, current)
        if current == wanted:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(wanted)
    for path in stale:
        print(f"{path} is out of date with docs/bench/: run python benchmarks/tables.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
