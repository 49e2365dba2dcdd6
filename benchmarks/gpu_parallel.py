"""Two ways to spend the GPUs of one host, measured in one run: one-GPU workers (PARALLEL=1, throughput) against
worker groups that split each image across GPUs (PARALLEL=2 and, on a 4-GPU host, 4: latency).

    python benchmarks/gpu_parallel.py --out $OUT      # 2 GPUs: random FLUX.1-dev, tier L, 1024², 28 steps
    python benchmarks/gpu_parallel.py --out $OUT --attention auto,diffusers   # two kinds of group
    python benchmarks/gpu_parallel.py --out /tmp/p --model-repo digits --devices cpu,cpu --size 32 --tier XL

For each PARALLEL value and each --cuda-graphs setting (CUDA_GRAPHS), and for groups each --attention way of
splitting attention (PARALLEL_ATTENTION) and each --parallel-decode setting (PARALLEL_DECODE), on the same
devices, and with --one-worker also one one-GPU worker on the first device (the baseline of throughput
scaling): a cold `diffuserve serve` (its own empty cache dir, so each start compiles its own graphs), timed
until every worker (group) is ready; one untimed request; then lone requests over HTTP one after another (round
trip and the server's own split); then a closed loop (each user sends its next request when its last is back).
Every figure is given next to the PARALLEL=1 figure of the same run (with the same CUDA_GRAPHS where measured).
MODEL_BATCH=1 keeps the warm-up to one compiled batch size; the cold starts with compile (about 60-80 s each on
an H200) take most of the run, which is sized to end within 7 minutes on 2 × H200. Raw output:
--out/parallel.json; the table: --out/parallel.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import httpx

from common import PROMPT, ROOT, closed_loop, environment, log, median, out_dir, post, write_json
from diffuserve.bench.server import SpawnedServer

ATTENTION = ("auto", "diffusers")  # PARALLEL_ATTENTION
CUDA_GRAPHS = ("auto", "off")
PARALLEL_DECODE = ("on", "off")


def serve_args(args: argparse.Namespace, run: Run, cache_dir: str) -> list[str]:
    flags = ["--model-repo", args.model_repo, "--weights", args.weights, "--tier", args.tier]
    flags += ["--model-batch", str(args.model_batch), "--cache-dir", cache_dir, "--cuda-graphs", run.graphs]
    flags += ["--devices", run.devices, "--parallel", str(run.parallel)]
    flags += ["--parallel-attention", run.attention]
    flags += ["--parallel-decode" if run.decode == "on" else "--no-parallel-decode"]
    return flags


def wait_all_ready(server: SpawnedServer, expected: int, timeout: float) -> list[dict[str, Any]]:
    """/health/ready turns 200 with the first ready worker; measuring then would under-count the others."""
    deadline = time.monotonic() + timeout
    while True:
        workers = httpx.get(f"{server.base_url}/health/ready", timeout=10).json()["workers"]
        ready = [w for w in workers if w["state"] in ("idle", "busy")]
        if len(ready) == expected:
            return list(workers)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(ready)} of {expected} workers ready after {timeout:g} s: {workers}")
        time.sleep(0.25)


def lone_requests(base: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    url = f"{base}/v1/images/generations"
    runs = []
    with httpx.Client() as client:
        for i in range(args.lone + 1):
            body = {"prompt": PROMPT, "seed": 100 + i, "size": f"{args.size}x{args.size}"}
            runs.append(post(client, url, body))
    log(f"lone: {[r['round_trip_ms'] for r in runs[1:]]}")
    return runs[1:]  # the first warms the API's path and the encoder


@dataclass(frozen=True)
class Run:
    """One server of the comparison: its devices, PARALLEL, CUDA_GRAPHS, and for groups how they split
    attention and decode."""

    devices: str
    parallel: int
    attention: str
    graphs: str = "auto"
    decode: str = "on"

    @property
    def workers(self) -> int:
        return len(self.devices.split(",")) // self.parallel

    @property
    def label(self) -> str:
        if self.parallel == 1:
            return f"1x{self.workers}-graphs-{self.graphs}"
        return f"{self.parallel}-{self.attention}-graphs-{self.graphs}-decode-{self.decode}"


def measure(args: argparse.Namespace, spec: Run) -> dict[str, Any]:
    parallel, workers, label = spec.parallel, spec.workers, spec.label
    cache_dir = tempfile.mkdtemp(prefix=f"diffuserve-cache-p{label}-")
    server = SpawnedServer(
        args.out / f"server-parallel{label}.log",
        env={"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])},
        ready_timeout=args.ready_timeout,
        serve_args=serve_args(args, spec, cache_dir),
        stop_grace=30,
    )
    started = time.perf_counter()
    with server:
        described = wait_all_ready(server, workers, args.ready_timeout)
        run: dict[str, Any] = {
            "parallel": parallel,
            "attention": None if parallel == 1 else spec.attention,
            "cuda_graphs": spec.graphs,
            "parallel_decode": None if parallel == 1 else spec.decode,
            "devices": spec.devices,
            "worker_count": workers,
            "workers": [
                {k: w.get(k) for k in ("id", "device", "devices", "start_seconds")} for w in described
            ],
            "all_ready_s": round(time.perf_counter() - started, 2),
        }
        model = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]
        run["model"], run["steps"] = model["id"], model.get("default_steps")
        log(f"PARALLEL={label}: {workers} worker(s) ready in {run['all_ready_s']} s")
        lone = lone_requests(server.base_url, args)
        ok = [r for r in lone if r["status"] == 200]
        run["lone"] = lone
        run["lone_failures"] = len(lone) - len(ok)
        if ok:
            run["lone_p50_ms"] = round(median([r["round_trip_ms"] for r in ok]), 1)
            run["lone_min_ms"] = round(min(r["round_trip_ms"] for r in ok), 1)
            for phase in ("denoise", "decode", "encode"):
                run[f"lone_{phase}_p50_ms"] = round(median([r["timing"].get(phase, 0) for r in ok]), 1)
        run["closed_loop"] = closed_loop(server.base_url, args.users, args.per_user, args.size)
    return run


def compare(runs: list[dict[str, Any]], devices: int) -> None:
    """Each run's figures as a ratio of the PARALLEL=1 run's on all devices (the one-GPU-worker baseline, with
    the same CUDA_GRAPHS where one was measured), and the throughput of every run next to that of one one-GPU
    worker where one was measured."""
    for run in runs:
        ones = [r for r in runs if r["parallel"] == 1]
        ones.sort(key=lambda r: r["cuda_graphs"] != run["cuda_graphs"])  # the same setting first
        base = next((r for r in ones if r["worker_count"] == devices), None)
        single = next((r for r in ones if r["worker_count"] == 1), None)
        if single is not None and single["closed_loop"]["images_per_s"]:
            rate = run["closed_loop"]["images_per_s"] / single["closed_loop"]["images_per_s"]
            run["throughput_vs_one_worker"] = round(rate, 3)
        if base is None:
            continue
        if run.get("lone_p50_ms") and base.get("lone_p50_ms"):
            run["lone_vs_parallel1"] = round(run["lone_p50_ms"] / base["lone_p50_ms"], 3)
        base_rate = base["closed_loop"]["images_per_s"]
        if base_rate:
            run["throughput_vs_parallel1"] = round(run["closed_loop"]["images_per_s"] / base_rate, 3)


def table(runs: list[dict[str, Any]], devices: int) -> str:
    rows = [
        "| PARALLEL | attention | CUDA graphs | joint decode | workers | lone request p50 ms | × PARALLEL=1 | "
        "decode ms | closed loop images/s | × PARALLEL=1 | × one worker | all ready s |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        loop = run["closed_loop"]
        rows.append(
            f"| {run['parallel']} | {run.get('attention') or '-'} | {run.get('cuda_graphs', 'auto')} | "
            f"{run.get('parallel_decode') or '-'} | {run.get('worker_count', devices // run['parallel'])} | "
            f"{run.get('lone_p50_ms')} | {run.get('lone_vs_parallel1')} | {run.get('lone_decode_p50_ms')} | "
            f"{loop['images_per_s']} | {run.get('throughput_vs_parallel1')} | "
            f"{run.get('throughput_vs_one_worker', '-')} | {run['all_ready_s']} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--model-repo", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--weights", choices=["random", "pretrained"], default="random")
    parser.add_argument("--tier", default="L")
    parser.add_argument("--model-batch", type=int, default=1)
    parser.add_argument("--devices", default="0,1", help="the same devices for every PARALLEL value")
    parser.add_argument(
        "--parallel", default=None, help="values to compare; default 1,2 (and 4 on 4 devices)"
    )
    parser.add_argument(
        "--attention",
        default="auto",
        help="PARALLEL_ATTENTION values each group runs with, in turn: auto (the server's default), diffusers, "
        "or auto,diffusers",
    )
    parser.add_argument(
        "--cuda-graphs",
        default="auto",
        help="CUDA_GRAPHS values every server runs with, in turn: auto (the default: graphs in tiers XL and L "
        "on CUDA), off, or auto,off",
    )
    parser.add_argument(
        "--parallel-decode",
        default="on",
        help="PARALLEL_DECODE values each group runs with, in turn: on,off also measures the group whose "
        "leader decodes alone",
    )
    parser.add_argument(
        "--one-worker",
        action="store_true",
        help="also serve with one one-GPU worker on the first device: the throughput scaling baseline",
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--lone", type=int, default=5, help="timed lone requests per PARALLEL value")
    parser.add_argument("--users", type=int, default=4, help="closed-loop users")
    parser.add_argument("--per-user", type=int, default=3, help="requests each closed-loop user sends")
    parser.add_argument("--ready-timeout", type=float, default=300)
    args = parser.parse_args()
    attentions = [a for a in args.attention.split(",") if a]
    graphs = [g for g in args.cuda_graphs.split(",") if g]
    decodes = [d for d in args.parallel_decode.split(",") if d]
    for name, values, known in (
        ("--attention", attentions, ATTENTION),
        ("--cuda-graphs", graphs, CUDA_GRAPHS),
        ("--parallel-decode", decodes, PARALLEL_DECODE),
    ):
        if not values or set(values) - set(known):
            parser.error(f"{name} takes {', '.join(known)} (comma-separated), not {','.join(values)!r}")
    devices = len([d for d in args.devices.split(",") if d.strip()])
    if args.parallel:
        values = [int(v) for v in args.parallel.split(",")]
    else:
        values = [p for p in (1, 2, 4) if p <= devices and devices % p == 0]
    args.out = out_dir(args.out)
    results: dict[str, Any] = {"args": {**vars(args), "out": str(args.out)}, "environment": environment()}
    results["runs"] = []

    def save() -> None:
        write_json(args.out / "parallel.json", results)

    started = time.perf_counter()
    first = args.devices.split(",")[0].strip()
    specs = [Run(first, 1, attentions[0], g) for g in graphs] if args.one_worker else []
    for parallel in values:
        if parallel == 1:
            specs += [Run(args.devices, 1, attentions[0], g) for g in graphs]
            continue
        specs += [Run(args.devices, parallel, a, g, d) for a in attentions for g in graphs for d in decodes]
    for spec in specs:
        results["runs"].append(measure(args, spec))
        compare(results["runs"], devices)
        save()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    save()
    (args.out / "parallel.md").write_text(table(results["runs"], devices) + "\n")
    log(f"done in {results['wall_s']} s:\n" + table(results["runs"], devices))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
