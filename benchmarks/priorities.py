"""Priority classes under a mixed load: the latency of interactive requests (one a second) while a backlog of
`batch` jobs runs, against the same requests on the idle server, in three schedules of one server build:
priorities with preemption (the default), priorities without it (PREEMPT=false), and first come first served
(every request of one class). Also how long the backlog took, and how many requests were preempted.

    python benchmarks/priorities.py --out docs/bench                     # the digits model on this CPU
    python benchmarks/priorities.py --model black-forest-labs/FLUX.1-schnell --devices cuda:0 \\
        --weights random --tier L --job '{"n": 4, "num_inference_steps": 4}' --out docs/bench

The server is the real app with its real worker processes, driven in this process over ASGI (no sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from common import environment, log, out_dir, write_json
from diffuserve.api.app import build_app
from diffuserve.config import Settings

SCHEDULES = {
    # name: (preempt, interactive class, job class)
    "priorities": (True, "interactive", "batch"),
    "no-preemption": (False, "interactive", "batch"),
    "fifo": (False, "default", "default"),
}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[round(0.95 * (len(ordered) - 1))]


async def one_schedule(args: argparse.Namespace, name: str) -> dict[str, Any]:
    preempt, interactive_class, job_class = SCHEDULES[name]
    settings = Settings.from_env(
        {},
        models=[args.model],
        devices=args.devices,
        weights=args.weights,
        model_size=args.tier,
        model_batch=args.batch,
        preempt=preempt,
        cpu_threads=1 if args.devices == "cpu" else None,
        request_timeout=600.0,
        max_queue=1024,
    )
    app = build_app(settings)
    body = {"prompt": "the digit 7", "output_format": "jpeg", **json.loads(args.interactive)}
    job = {**body, **json.loads(args.job), "priority": job_class}

    async def interactive(http: httpx.AsyncClient, seed: int) -> float:
        started = time.perf_counter()
        answer = await http.post(
            "/v1/images/generations",
            json={**body, "seed": seed, "priority": interactive_class, "response_format": "b64_json"},
        )
        answer.raise_for_status()
        return time.perf_counter() - started

    async with app.router.lifespan_context(app):
        while not app.state.service.ready:
            await asyncio.sleep(0.1)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as http:
            for seed in range(3):
                await interactive(http, seed)
            idle = [await interactive(http, seed) for seed in range(args.requests)]
            jobs = []
            for index in range(args.jobs):
                answer = await http.post("/v1/images/jobs", json={**job, "seed": 100 + index})
                answer.raise_for_status()
                jobs.append(answer.json()["id"])
            started = time.monotonic()
            loaded = []
            for seed in range(args.requests):
                loaded.append(await interactive(http, 1000 + seed))
                await asyncio.sleep(max(0.0, started + seed + 1 - time.monotonic()))
            while True:
                views = [(await http.get(f"/v1/images/jobs/{job_id}")).json() for job_id in jobs]
                if all(view["status"] in ("succeeded", "failed", "cancelled") for view in views):
                    break
                await asyncio.sleep(0.2)
            backlog_s = max(view["finished_at"] for view in views) - min(view["created_at"] for view in views)
            preempted = sum(
                s.value
                for family in app.state.metrics.registry.collect()
                for s in family.samples
                if s.name == "diffuserve_preempted_requests_total"
            )
    row = {
        "schedule": name,
        "idle_p50_s": round(statistics.median(idle), 4),
        "idle_p95_s": round(p95(idle), 4),
        "loaded_p50_s": round(statistics.median(loaded), 4),
        "loaded_p95_s": round(p95(loaded), 4),
        "p95_ratio": round(p95(loaded) / p95(idle), 2),
        "jobs_succeeded": sum(view["status"] == "succeeded" for view in views),
        "backlog_s": round(backlog_s, 2),
        "preempted_requests": int(preempted),
    }
    log(f"{name}: {row}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="digits")
    parser.add_argument("--devices", default="cpu")
    parser.add_argument(
        "--weights", default="pretrained", help="random: the real architecture, random weights"
    )
    parser.add_argument("--tier", default="XL")
    parser.add_argument("--batch", type=int, default=8, help="MODEL_BATCH")
    parser.add_argument("--jobs", type=int, default=50, help="batch jobs queued at once")
    parser.add_argument("--requests", type=int, default=20, help="interactive requests, idle and loaded each")
    parser.add_argument("--interactive", default="{}", help="JSON fields of each interactive request")
    parser.add_argument(
        "--job",
        default='{"n": 8, "size": "64x64", "num_inference_steps": 20}',
        help="JSON fields of each batch job (beside the interactive request's)",
    )
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = out_dir(args.out)
    rows = [asyncio.run(one_schedule(args, name)) for name in args.schedules.split(",")]
    result = {
        "environment": environment(),
        "model": args.model,
        "devices": args.devices,
        "tier": args.tier,
        "batch": args.batch,
        "jobs": args.jobs,
        "requests": args.requests,
        "interactive": json.loads(args.interactive),
        "job": json.loads(args.job),
        "schedules": rows,
    }
    card = "cpu" if args.devices == "cpu" else environment()["gpu"].split()[1].lower()
    write_json(out / f"{card}-priorities-{args.model.split('/')[-1].lower()}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
