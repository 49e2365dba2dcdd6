"""Start-up and first-request latency of `diffuserve serve`: does any batch size compile on a user's request?

Starts the server with the given flags, records time to ready (the warm-up included), then times lone
requests and full concurrent batches. A lone request much slower than the others means its batch size was
not warmed up. Usage (GPU machine, random weights, no download):

    python benchmarks/gpu_warmup.py -- --model-repo black-forest-labs/FLUX.1-schnell --weights random \\
        --tier XL --model-batch 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import httpx

from diffuserve.bench.server import ServerError, SpawnedServer


def timed_post(url: str, body: dict) -> tuple[float, int, str]:
    started = time.perf_counter()
    response = httpx.post(url, json=body, timeout=600)
    return time.perf_counter() - started, response.status_code, response.headers.get("x-batch-size", "-")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".", help="folder for the server log and results.json")
    parser.add_argument("--lone", type=int, default=3, help="lone requests to time")
    parser.add_argument("--ready-timeout", type=float, default=480)
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="flags for `diffuserve serve` after --")
    args = parser.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The bench's spawner: own session, log file closed, the whole group stopped even if the server died first.
    server = SpawnedServer(
        out / "warmup-server.log", ready_timeout=args.ready_timeout, serve_args=serve_args, stop_grace=60
    )
    started = time.perf_counter()
    try:
        with server:
            ready_s = time.perf_counter() - started
            base = server.base_url
            batch = int(httpx.get(f"{base}/v1/models").json()["data"][0]["id"].rsplit("-bs", 1)[1])
            url = f"{base}/v1/images/generations"
            lone = [timed_post(url, {"prompt": "a lighthouse", "seed": i}) for i in range(args.lone)]
            with concurrent.futures.ThreadPoolExecutor(batch) as pool:
                full = list(
                    pool.map(
                        lambda i: timed_post(url, {"prompt": "a lighthouse", "seed": 100 + i}), range(batch)
                    )
                )
    except ServerError as exc:
        print(exc)
        return 1
    results = {
        "serve_args": serve_args,
        "ready_s": round(ready_s, 1),
        "lone_s": [round(t, 3) for t, _, _ in lone],
        "lone_status": [s for _, s, _ in lone],
        "concurrent_s": [round(t, 3) for t, _, _ in full],
        "concurrent_batch_sizes": [b for _, _, b in full],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
