"""Per-request samples → per-step numbers (latency percentiles, throughput, overhead) and the JSON/Markdown report."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from diffuserve.bench.metrics import ServerDelta

SAMPLES_FILE = "requests.csv"


@dataclass
class RequestSample:
    """One request as the client saw it, with the timing headers the server sent back."""

    start: float  # seconds since the epoch, when the request was sent
    latency_ms: float  # HTTP round trip, body included
    ok: bool
    status: int  # 0 when no HTTP response came back
    images: int  # images received (0 on failure)
    queue_ms: float | None = None  # x-queue-ms
    inference_ms: float | None = None  # x-inference-ms: pipeline time of the batch the request ran in
    batch_size: int | None = None  # x-batch-size: images in that batch
    request_id: str = ""
    error: str = ""

    @property
    def end(self) -> float:
        return self.start + self.latency_ms / 1000.0


def write_samples(path: Path, samples: Iterable[RequestSample]) -> None:
    names = [f.name for f in fields(RequestSample)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for sample in samples:
            row = asdict(sample)
            row["ok"] = int(sample.ok)
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_samples(path: Path) -> list[RequestSample]:
    def opt(raw: str, cast: Any) -> Any:
        return cast(raw) if raw != "" else None

    with path.open(newline="", encoding="utf-8") as fh:
        return [
            RequestSample(
                start=float(row["start"]),
                latency_ms=float(row["latency_ms"]),
                ok=row["ok"] == "1",
                status=int(row["status"]),
                images=int(row["images"]),
                queue_ms=opt(row["queue_ms"], float),
                inference_ms=opt(row["inference_ms"], float),
                batch_size=opt(row["batch_size"], int),
                request_id=row["request_id"],
                error=row["error"],
            )
            for row in csv.DictReader(fh)
        ]


@dataclass
class Distribution:
    """Mean and percentiles of one quantity in milliseconds (linear interpolation between samples)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        if not values:
            return None
        arr = np.asarray(values, dtype=float)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99])
        return cls(
            count=len(arr),
            mean=float(arr.mean()),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            min=float(arr.min()),
            max=float(arr.max()),
        )


@dataclass
class StepSummary:
    """One user count of the sweep."""

    users: int
    requests: int
    failures: int
    images: int
    duration_s: float  # first request sent → last response received
    requests_per_s: float
    images_per_s: float
    latency_ms: Distribution | None  # successful requests only: a fast 429 is not a latency
    queue_ms: Distribution | None  # x-queue-ms of successful requests
    inference_ms: Distribution | None  # x-inference-ms of successful requests
    # Client-side overhead: HTTP round trip minus the server's queue and inference time (HTTP, JSON/image
    # encoding, IPC); rtt_minus_inference_ms keeps the queue wait in.
    overhead_ms: Distribution | None
    rtt_minus_inference_ms: Distribution | None
    batch_sizes: dict[str, int]  # requests by the x-batch-size of the batch they ran in
    errors: dict[str, int]
    server: ServerDelta | None = None  # /metrics deltas over the step; None where /metrics was unreachable
    # Mean round trip minus the server's mean request time (/metrics): the HTTP/network share of the overhead.
    # Only when every request succeeded, so that both means cover the same requests.
    transport_ms_mean: float | None = None


def summarize_step(
    users: int, samples: Sequence[RequestSample], server: ServerDelta | None = None
) -> StepSummary:
    ok = [s for s in samples if s.ok]
    images = sum(s.images for s in ok)
    duration = (max(s.end for s in samples) - min(s.start for s in samples)) if samples else 0.0
    timed = [s for s in ok if s.inference_ms is not None]
    overhead = [
        s.latency_ms - s.inference_ms - (s.queue_ms or 0.0) for s in timed if s.inference_ms is not None
    ]
    minus_inference = [s.latency_ms - s.inference_ms for s in timed if s.inference_ms is not None]
    batch_sizes = Counter(str(s.batch_size) for s in ok if s.batch_size is not None)
    errors = Counter(s.error or f"HTTP {s.status}" for s in samples if not s.ok)
    latency = Distribution.of([s.latency_ms for s in ok])
    transport = None
    if (
        server is not None
        and server.mean_request_ms is not None
        and latency is not None
        and len(ok) == len(samples)
    ):
        transport = latency.mean - server.mean_request_ms
    return StepSummary(
        users=users,
        requests=len(samples),
        failures=len(samples) - len(ok),
        images=images,
        duration_s=duration,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        images_per_s=images / duration if duration > 0 else 0.0,
        latency_ms=latency,
        queue_ms=Distribution.of([s.queue_ms for s in ok if s.queue_ms is not None]),
        inference_ms=Distribution.of([s.inference_ms for s in timed if s.inference_ms is not None]),
        overhead_ms=Distribution.of(overhead),
        rtt_minus_inference_ms=Distribution.of(minus_inference),
        batch_sizes=dict(sorted(batch_sizes.items(), key=lambda kv: int(kv[0]))),
        errors=dict(errors.most_common()),
        server=server,
        transport_ms_mean=transport,
    )


def write_summary_json(path: Path, meta: dict[str, Any], steps: Sequence[StepSummary]) -> None:
    data = {**meta, "steps": [asdict(step) for step in steps]}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _ms(dist: Distribution | None, attr: str) -> str:
    return f"{getattr(dist, attr):.1f}" if dist is not None else "–"


def _num(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value is not None else "–"


def markdown_table(steps: Sequence[StepSummary]) -> str:
    """The client view: one row per user count."""
    rows = [
        "| users | requests | failures | p50 ms | p90 ms | p99 ms | images/s | overhead p50 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        rows.append(
            f"| {s.users} | {s.requests} | {s.failures} | {_ms(s.latency_ms, 'p50')} | {_ms(s.latency_ms, 'p90')} "
            f"| {_ms(s.latency_ms, 'p99')} | {s.images_per_s:.2f} | {_ms(s.overhead_ms, 'p50')} |"
        )
    return "\n".join(rows)


def markdown_server_table(steps: Sequence[StepSummary]) -> str:
    """The server view from /metrics deltas: did latency come from queueing or from compute?"""
    rows = [
        "| users | batches | mean batch size | batch sizes (size: batches) | mean queue ms | mean inference ms "
        "| mean request ms |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for s in steps:
        srv = s.server
        if srv is None:
            rows.append(f"| {s.users} | – | – | /metrics unavailable | – | – | – |")
            continue
        sizes = ", ".join(f"{le}: {n}" for le, n in srv.batch_size_buckets.items()) or "–"
        rows.append(
            f"| {s.users} | {srv.batches} | {_num(srv.mean_batch_size, 2)} | {sizes} | {_num(srv.mean_queue_ms)} "
            f"| {_num(srv.mean_inference_ms)} | {_num(srv.mean_request_ms)} |"
        )
    return "\n".join(rows)


def markdown_overhead_table(steps: Sequence[StepSummary]) -> str:
    """Where the time outside the model goes: the round trip less the server's reported times."""
    rows = [
        "| users | RTT − inference p50 ms | overhead p50 ms | overhead mean ms | overhead p90 ms "
        "| RTT − server request time, mean ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        rows.append(
            f"| {s.users} | {_ms(s.rtt_minus_inference_ms, 'p50')} | {_ms(s.overhead_ms, 'p50')} "
            f"| {_ms(s.overhead_ms, 'mean')} | {_ms(s.overhead_ms, 'p90')} | {_num(s.transport_ms_mean)} |"
        )
    return "\n".join(rows)


def markdown_report(meta: dict[str, Any], steps: Sequence[StepSummary]) -> str:
    opts = meta.get("options", {})
    payload = ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None)
    lines = [
        f"# diffuserve bench: {meta.get('model') or 'default model'} at {meta.get('url')}",
        "",
        f"- date: {meta.get('created')}",
        f"- command: `{meta.get('command')}`",
        f"- load: {meta.get('load')}",
        f"- payload: {payload}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}",
        f"- client machine: {meta.get('machine')}",
        "",
        "## Client view",
        "",
        "Latency is the HTTP round trip of successful requests; images/s counts images received over the step's",
        "wall time; overhead is round trip minus the server's `x-queue-ms` and `x-inference-ms`.",
        "",
        markdown_table(steps),
        "",
        "## Overhead",
        "",
        "Overhead = HTTP round trip − `x-queue-ms` − `x-inference-ms` of each successful request (HTTP, request",
        "parsing, scheduling, IPC to the worker, image encoding). The last column is the mean round trip minus the",
        "server's own mean request time from `/metrics`: the part spent outside the server's handler.",
        "",
        markdown_overhead_table(steps),
        "",
        "## Server view (`/metrics` deltas over each step)",
        "",
        markdown_server_table(steps),
        "",
    ]
    failing = [s for s in steps if s.errors]
    if failing:
        lines += ["## Failures", ""]
        for s in failing:
            lines += [f"- {s.users} users: " + "; ".join(f"{n}× {err}" for err, n in s.errors.items())]
        lines.append("")
    return "\n".join(lines)
