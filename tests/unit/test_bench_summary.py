"""`diffuserve bench`'s summary maths: percentiles, throughput, overhead, the samples CSV and the Markdown tables."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import pytest

from diffuserve.bench.command import command_line, recorded_server_env, register, report_meta
from diffuserve.bench.metrics import ServerDelta
from diffuserve.bench.options import LoadOptions
from diffuserve.bench.summary import (
    Distribution,
    RequestSample,
    markdown_report,
    markdown_table,
    read_samples,
    summarize_step,
    write_samples,
    write_summary_json,
)
from diffuserve.bench.sweep import SweepPlan


def ok(
    start: float, latency: float, queue: float, inference: float, batch: int = 1, images: int = 1
) -> RequestSample:
    return RequestSample(
        start=start,
        latency_ms=latency,
        ok=True,
        status=200,
        images=images,
        queue_ms=queue,
        inference_ms=inference,
        batch_size=batch,
        request_id=f"r{start}",
    )


def failed(start: float, latency: float, status: int = 429) -> RequestSample:
    return RequestSample(
        start=start, latency_ms=latency, ok=False, status=status, images=0, error=f"HTTP {status}: queue full"
    )


def test_distribution_interpolates_linearly() -> None:
    dist = Distribution.of([float(v) for v in range(1, 101)])  # 1..100
    assert dist is not None
    assert dist.count == 100
    assert dist.mean == pytest.approx(50.5)
    assert dist.p50 == pytest.approx(50.5)
    assert dist.p90 == pytest.approx(90.1)
    assert dist.p99 == pytest.approx(99.01)
    assert (dist.min, dist.max) == (1.0, 100.0)
    assert Distribution.of([]) is None


def test_summarize_step_latency_throughput_and_overhead() -> None:
    samples = [
        ok(start=10.0, latency=100.0, queue=0.0, inference=96.0),
        ok(start=10.1, latency=200.0, queue=90.0, inference=104.0, batch=2, images=2),
        ok(start=10.3, latency=300.0, queue=150.0, inference=140.0, batch=2),
        failed(start=10.4, latency=5.0),
    ]
    step = summarize_step(users=2, samples=samples)
    assert (step.users, step.requests, step.failures, step.images) == (2, 4, 1, 4)
    # Window: first start 10.0 → last end 10.3 + 0.3 = 10.6.
    assert step.duration_s == pytest.approx(0.6)
    assert step.images_per_s == pytest.approx(4 / 0.6)
    assert step.requests_per_s == pytest.approx(3 / 0.6)
    # The fast 429 stays out of the latency percentiles.
    assert step.latency_ms is not None
    assert step.latency_ms.p50 == pytest.approx(200.0)
    assert step.latency_ms.min == pytest.approx(100.0)
    # Overhead = RTT − queue − inference: 4, 6, 10 ms.
    assert step.overhead_ms is not None
    assert step.overhead_ms.p50 == pytest.approx(6.0)
    assert step.overhead_ms.mean == pytest.approx(20 / 3)
    assert step.rtt_minus_inference_ms is not None
    assert step.rtt_minus_inference_ms.p50 == pytest.approx(96.0)
    assert step.batch_sizes == {"1": 1, "2": 2}
    assert step.errors == {"HTTP 429: queue full": 1}
    assert step.transport_ms_mean is None  # no server view


def test_transport_share_needs_server_view_and_no_failures() -> None:
    samples = [ok(0.0, 100.0, 0.0, 90.0), ok(0.1, 110.0, 0.0, 100.0)]
    server = ServerDelta(mean_request_ms=102.0)
    step = summarize_step(1, samples, server)
    assert step.transport_ms_mean == pytest.approx(105.0 - 102.0)
    assert summarize_step(1, [*samples, failed(0.2, 1.0)], server).transport_ms_mean is None


def test_requests_without_timing_headers_count_but_give_no_overhead() -> None:
    sample = RequestSample(start=0.0, latency_ms=50.0, ok=True, status=200, images=1)
    step = summarize_step(1, [sample])
    assert step.requests == 1 and step.images == 1
    assert step.overhead_ms is None
    assert step.batch_sizes == {}


def test_empty_step() -> None:
    step = summarize_step(4, [])
    assert (step.requests, step.images, step.duration_s, step.images_per_s) == (0, 0, 0.0, 0.0)
    assert step.latency_ms is None


def test_samples_csv_round_trip(tmp_path: Path) -> None:
    samples = [ok(1.5, 12.25, 0.1, 11.0, batch=3), failed(2.0, 3.5, status=0)]
    path = tmp_path / "requests.csv"
    write_samples(path, samples)
    assert read_samples(path) == samples


def test_markdown_and_json_hold_the_step_numbers(tmp_path: Path) -> None:
    steps = [
        summarize_step(1, [ok(0.0, 100.0, 0.0, 97.0), ok(0.1, 102.0, 0.0, 98.0)]),
        summarize_step(
            4,
            [ok(0.0, 300.0, 100.0, 190.0, batch=4), failed(0.1, 2.0)],
            ServerDelta(batches=1, mean_batch_size=4.0, batch_size_buckets={"4": 1}, mean_queue_ms=100.0),
        ),
    ]
    table = markdown_table(steps).splitlines()
    assert table[0].startswith("| users | requests | failures | p50 ms | p90 ms | p99 ms | images/s")
    assert table[2].startswith("| 1 | 2 | 0 | 101.0 |")
    assert table[3].startswith("| 4 | 2 | 1 | 300.0 |")

    meta = {"url": "http://x", "model": "tiny", "options": {"n": 1}, "versions": {"locust": "2"}}
    report = markdown_report(meta, steps)
    assert "| 4 | 1 | 4.00 | 4: 1 | 100.0 |" in report
    assert "| 1 | – | – | /metrics unavailable |" in report
    assert "1× HTTP 429: queue full" in report

    write_summary_json(tmp_path / "summary.json", meta, steps)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [s["requests"] for s in data["steps"]] == [2, 2]
    assert data["steps"][1]["server"]["batch_size_buckets"] == {"4": 1}
    assert data["steps"][0]["overhead_ms"]["p50"] == pytest.approx(3.5)


def test_command_line_masks_the_api_key() -> None:
    argv = ["/x/bin/diffuserve", "bench", "http://h", "--api-key", "s3cret", "--users", "1"]
    assert command_line(argv) == "diffuserve bench http://h --api-key '***' --users 1"
    assert "s3cret" not in command_line(["diffuserve", "bench", "--api-key=s3cret"])


def test_secret_server_env_values_never_reach_the_reports(tmp_path: Path) -> None:
    argv = ["/x/bin/diffuserve", "bench", "--spawn-server", "--server-env", "HF_TOKEN=hf_s3cret"]
    argv += ["--server-env=MODEL_BATCH=4", "--server-env=API_KEYS=k3y", "--server-e", "db_password=pw0rd"]
    argv += ["--ap=abc123", "--output", str(tmp_path)]
    line = command_line(argv)
    assert "--server-env 'HF_TOKEN=***'" in line and "'--server-env=API_KEYS=***'" in line
    assert "--server-e 'db_password=***'" in line and "'--ap=***'" in line  # abbreviations argparse takes
    assert "--server-env=MODEL_BATCH=4" in line  # nothing secret in the name: the value stays for a rerun
    assert recorded_server_env(["HF_TOKEN=hf_s3cret", "MODEL_BATCH=4", "AWS_SECRET_ACCESS_KEY=x"]) == {
        "HF_TOKEN": "***",
        "MODEL_BATCH": "4",
        "AWS_SECRET_ACCESS_KEY": "***",
    }

    # Both reports, as `diffuserve bench` writes them.
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv[1:])
    plan = SweepPlan(users=[1], options=LoadOptions(url="http://127.0.0.1:9", model="m"), output=tmp_path)
    meta = report_meta(args, plan, dt.datetime.now(dt.timezone.utc), argv)
    assert meta["server_env"] == {
        "HF_TOKEN": "***",
        "MODEL_BATCH": "4",
        "API_KEYS": "***",
        "db_password": "***",
    }
    write_summary_json(tmp_path / "summary.json", meta, [])
    reports = (tmp_path / "summary.json").read_text() + markdown_report(meta, [])
    assert "HF_TOKEN" in reports
    for secret in ("hf_s3cret", "k3y", "pw0rd", "abc123"):
        assert secret not in reports
