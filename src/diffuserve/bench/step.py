"""One sweep step in its own process: locust as a library, N users, CSV + HTML reports + per-request samples.

Run by `diffuserve bench` as `python -m diffuserve.bench.step --users N --out DIR [--duration S]`, with the
load options in BENCH_* env vars. A process per step keeps gevent's monkey-patching out of the command's own
process and gives each step fresh locust statistics. Progress goes to stdout as one JSON object per line.
"""

from __future__ import annotations

# locust patches the standard library with gevent on import: it must come before anything that opens sockets.
import locust  # isort: skip

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gevent
from locust.env import Environment
from locust.html import get_html_report
from locust.log import setup_logging
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV, StatsCSVFileWriter, stats_history

from diffuserve.bench import locustfile
from diffuserve.bench.summary import SAMPLES_FILE, RequestSample, write_samples

CSV_PREFIX = "locust"
HTML_REPORT = "report.html"
STEP_RESULT = "step.json"
PROGRESS_INTERVAL_S = 0.5


def _header_float(headers: Any, name: str) -> float | None:
    try:
        raw = headers.get(name) if headers is not None else None
        return float(raw) if raw not in (None, "") else None
    except (TypeError, ValueError):
        return None


def sample_from_event(
    *, response_time: float, response: Any, exception: Any, start_time: float, n: int, **_: Any
) -> RequestSample:
    headers = getattr(response, "headers", None)
    status = int(getattr(response, "status_code", 0) or 0)
    batch = _header_float(headers, "x-batch-size")
    return RequestSample(
        start=start_time,
        latency_ms=float(response_time),
        ok=exception is None,
        status=status,
        images=n if exception is None else 0,
        queue_ms=_header_float(headers, "x-queue-ms"),
        inference_ms=_header_float(headers, "x-inference-ms"),
        batch_size=int(batch) if batch is not None else None,
        request_id=(headers.get("x-request-id") or "") if headers is not None else "",
        error="" if exception is None else str(exception)[:300],
    )


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _quit_at(runner: Any, deadline: float) -> None:
    # Not gevent.spawn_later: its clock is the event loop's cached time, which lags after slow imports.
    while (left := deadline - time.monotonic()) > 0:
        gevent.sleep(left)
    runner.quit()


def run_step(users: int, out: Path, duration: float | None) -> int:
    options = locustfile.OPTIONS
    if options.iterations is None and duration is None:
        raise SystemExit("a step needs BENCH_ITERATIONS or --duration")
    out.mkdir(parents=True, exist_ok=True)

    # The locust file's listeners (the iteration budget) hang on the global `locust.events`.
    env = Environment(
        user_classes=[locustfile.ImageUser],
        events=locust.events,
        host=options.url,
        # On --duration, users finish the request in flight instead of being killed mid-way.
        stop_timeout=options.timeout,
    )
    runner = env.create_local_runner()
    samples: list[RequestSample] = []

    def on_request(**event: Any) -> None:
        samples.append(sample_from_event(n=options.n, **event))

    env.events.request.add_listener(on_request)

    csv_writer = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, str(out / CSV_PREFIX))
    background = [gevent.spawn(csv_writer.stats_writer), gevent.spawn(stats_history, runner)]

    started = time.time()

    def report_progress() -> None:
        while True:
            _emit(done=len(samples), failures=sum(not s.ok for s in samples), elapsed=time.time() - started)
            gevent.sleep(PROGRESS_INTERVAL_S)

    background.append(gevent.spawn(report_progress))
    runner.start(users, spawn_rate=users)
    if duration is not None:
        gevent.spawn(_quit_at, runner, time.monotonic() + duration)
    runner.greenlet.join()
    finished = time.time()
    gevent.killall(background, block=True)
    csv_writer.close_files()

    # The periodic writer may be up to a second behind; rewrite the final tables from the final stats.
    final = StatsCSV(env, PERCENTILES_TO_REPORT)
    for suffix, write in (
        ("stats", final.requests_csv),
        ("failures", final.failures_csv),
        ("exceptions", final.exceptions_csv),
    ):
        with (out / f"{CSV_PREFIX}_{suffix}.csv").open("w", newline="", encoding="utf-8") as fh:
            write(csv.writer(fh))
    (out / HTML_REPORT).write_text(get_html_report(env, show_download_link=False), encoding="utf-8")
    write_samples(out / SAMPLES_FILE, samples)
    total = env.stats.total
    result = {
        "users": users,
        "started": started,
        "finished": finished,
        "locust_requests": total.num_requests,
        "locust_failures": total.num_failures,
        "samples": len(samples),
        "exceptions": [exc["msg"] for exc in runner.exceptions.values()],
    }
    (out / STEP_RESULT).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _emit(done=len(samples), failures=sum(not s.ok for s in samples), elapsed=finished - started, final=True)
    # User code that raised (a bug, not a failed request) makes the step fail loudly.
    return 1 if runner.exceptions else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffuserve.bench.step", description=__doc__)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=None)
    args = parser.parse_args(argv)
    # Locust's own log lines go to stderr, which `diffuserve bench` saves as the step's locust.log.
    setup_logging("INFO")
    return run_step(args.users, args.out, args.duration)


if __name__ == "__main__":
    sys.exit(main())
