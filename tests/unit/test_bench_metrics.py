"""`diffuserve bench`'s /metrics deltas: parsing real Prometheus text and differencing counters and histograms."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from diffuserve.bench.metrics import delta_from_text, histogram_buckets, parse_metrics, server_delta


class FakeServerMetrics:
    """The server's metric names and label sets, in a registry of their own so text comes from prometheus_client."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("diffuserve_requests", "", ["model", "status"], registry=r)
        self.queue = Histogram("diffuserve_queue_seconds", "", buckets=(0.01, 0.1, 1), registry=r)
        self.inference = Histogram("diffuserve_inference_seconds", "", buckets=(0.01, 0.1, 1), registry=r)
        self.request = Histogram("diffuserve_request_seconds", "", buckets=(0.01, 0.1, 1), registry=r)
        self.batch = Histogram("diffuserve_batch_size", "", buckets=(1, 2, 3, 4, 8), registry=r)
        self.depth = Gauge("diffuserve_queue_depth", "", registry=r)
        self.images = Counter("diffuserve_images_generated", "", ["model"], registry=r)
        self.alive = Gauge("diffuserve_workers_alive", "", registry=r)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_parse_metrics_skips_created_timestamps_and_keeps_labels() -> None:
    m = FakeServerMetrics()
    m.requests.labels("tiny", "200").inc(3)
    series = parse_metrics(m.text())
    assert series[("diffuserve_requests_total", (("model", "tiny"), ("status", "200")))] == 3.0
    assert not any(name.endswith("_created") for name, _ in series)


def test_server_delta_counts_only_what_happened_between_scrapes() -> None:
    m = FakeServerMetrics()
    # Before the step: traffic that must not show up in the delta.
    m.requests.labels("tiny", "200").inc(5)
    m.batch.observe(4)
    m.queue.observe(0.5)
    m.inference.observe(0.9)
    m.images.labels("tiny").inc(5)
    before = parse_metrics(m.text())

    # The step: 3 batches (sizes 1, 3, 3), 7 images, one 429.
    for size in (1, 3, 3):
        m.batch.observe(size)
    for wait in (0.0, 0.02, 0.04, 0.04, 0.06, 0.06, 0.06):
        m.queue.observe(wait)
    for seconds in (0.2, 0.4, 0.6):
        m.inference.observe(seconds)
    for seconds in (0.25, 0.5, 0.75):
        m.request.observe(seconds)
    m.requests.labels("tiny", "200").inc(7)
    m.requests.labels("tiny", "429").inc()
    m.images.labels("tiny").inc(7)
    m.depth.set(2)
    m.alive.set(1)
    delta = server_delta(before, parse_metrics(m.text()))

    assert delta.requests_by_status == {"200": 7, "429": 1}
    assert delta.images_generated == 7
    assert delta.batches == 3
    assert delta.mean_batch_size == pytest.approx(7 / 3)
    assert delta.batch_size_buckets == {"1": 1, "3": 2}
    assert delta.mean_queue_ms == pytest.approx(1000 * 0.28 / 7)
    assert delta.mean_inference_ms == pytest.approx(400.0)
    assert delta.mean_request_ms == pytest.approx(500.0)
    assert delta.queue_depth_after == 2
    assert delta.workers_alive == 1


def test_model_filter_keeps_other_models_out_and_unlabelled_series_in() -> None:
    m = FakeServerMetrics()
    before = parse_metrics(m.text())
    m.requests.labels("tiny", "200").inc(2)
    m.requests.labels("other", "200").inc(9)
    m.images.labels("other").inc(9)
    m.batch.observe(2)
    delta = server_delta(before, parse_metrics(m.text()), model="tiny")
    assert delta.requests_by_status == {"200": 2}
    assert delta.images_generated == 0
    assert delta.batches == 1  # the batch histogram has no model label: it belongs to every model


def test_histogram_buckets_label_non_integer_and_infinite_bounds() -> None:
    m = FakeServerMetrics()
    before = parse_metrics(m.text())
    m.queue.observe(0.005)
    m.queue.observe(0.05)
    m.queue.observe(30.0)
    buckets = histogram_buckets(before, parse_metrics(m.text()), "diffuserve_queue_seconds")
    assert buckets == {"0.01": 1, "0.1": 1, "+Inf": 1}


def test_delta_is_none_when_a_scrape_failed() -> None:
    text = FakeServerMetrics().text()
    assert delta_from_text(None, text) is None
    assert delta_from_text(text, None) is None
    assert delta_from_text(text, text) is not None


def test_empty_step_has_no_means() -> None:
    text = FakeServerMetrics().text()
    delta = delta_from_text(text, text)
    assert delta is not None
    assert delta.batches == 0
    assert delta.mean_batch_size is None
    assert delta.mean_queue_ms is None
    assert delta.batch_size_buckets == {}
