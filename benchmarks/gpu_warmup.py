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
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    port = free_port()
    log = (out / "warmup-server.log").open("wb")
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "diffuserve", "serve", "--port", str(port), *serve_args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None or time.perf_counter() - started > args.ready_timeout:
                print((out / "warmup-server.log").read_text()[-4000:])
                return 1
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        ready_s = time.perf_counter() - started
        batch = int(httpx.get(f"{base}/v1/models").json()["data"][0]["id"].rsplit("-bs", 1)[1])
        url = f"{base}/v1/images/generations"
        lone = [timed_post(url, {"prompt": "a lighthouse", "seed": i}) for i in range(args.lone)]
        with concurrent.futures.ThreadPoolExecutor(batch) as pool:
            full = list(
                pool.map(lambda i: timed_post(url, {"prompt": "a lighthouse", "seed": 100 + i}), range(batch))
            )
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
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
