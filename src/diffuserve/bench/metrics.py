"""The server's own view of a benchmark step: deltas of diffuserve's Prometheus metrics between two scrapes."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# (sample name, sorted label pairs) → value
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Series:
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # `_created` samples are timestamps, not counts: a delta of them means nothing.
            if sample.name.endswith("_created"):
                continue
            series[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return series


def _matches(labels: tuple[tuple[str, str], ...], model: str | None) -> bool:
    # Series without a model label (queue depth, workers) belong to every model.
    return model is None or dict(labels).get("model", model) == model


def _total(series: Series, name: str, model: str | None) -> float:
    return sum(v for (n, labels), v in series.items() if n == name and _matches(labels, model))


def _delta_total(before: Series, after: Series, name: str, model: str | None) -> float:
    return _total(after, name, model) - _total(before, name, model)


def _format_le(le: str) -> str:
    value = float(le)
    if math.isinf(value):
        return "+Inf"
    return str(int(value)) if value.is_integer() else f"{value:g}"


def histogram_buckets(before: Series, after: Series, name: str, model: str | None = None) -> dict[str, int]:
    """Observations that fell in each bucket during the step, keyed by the bucket's upper bound (`le`).

    Prometheus buckets are cumulative; the difference of neighbours gives the count in (previous le, le].
    Buckets with no new observation are left out.
    """
    cumulative: dict[float, float] = defaultdict(float)
    labels_by_le: dict[float, str] = {}
    for series, sign in ((after, 1.0), (before, -1.0)):
        for (n, labels), value in series.items():
            if n != f"{name}_bucket" or not _matches(labels, model):
                continue
            le_raw = dict(labels).get("le")
            if le_raw is None:
                continue
            le = float(le_raw)
            cumulative[le] += sign * value
            labels_by_le[le] = _format_le(le_raw)
    out: dict[str, int] = {}
    previous = 0.0
    for le in sorted(cumulative):
        count = cumulative[le] - previous
        previous = cumulative[le]
        if count > 0:
            out[labels_by_le[le]] = round(count)
    return out


def _mean_ms(before: Series, after: Series, name: str, model: str | None) -> float | None:
    count = _delta_total(before, after, f"{name}_count", model)
    if count <= 0:
        return None
    return 1000.0 * _delta_total(before, after, f"{name}_sum", model) / count


@dataclass
class ServerDelta:
    """What the server counted between the scrapes before and after one step."""

    requests_by_status: dict[str, int] = field(default_factory=dict)
    images_generated: int = 0
    batches: int = 0
    mean_batch_size: float | None = None
    batch_size_buckets: dict[str, int] = field(default_factory=dict)  # batches by size bucket (le)
    mean_queue_ms: float | None = None
    mean_inference_ms: float | None = None
    mean_request_ms: float | None = None
    queue_depth_after: float | None = None
    workers_alive: float | None = None


def server_delta(before: Series, after: Series, model: str | None = None) -> ServerDelta:
    statuses: dict[str, float] = defaultdict(float)
    for series, sign in ((after, 1.0), (before, -1.0)):
        for (n, labels), value in series.items():
            if n == "diffuserve_requests_total" and _matches(labels, model):
                statuses[dict(labels).get("status", "?")] += sign * value
    batches = _delta_total(before, after, "diffuserve_batch_size_count", model)
    batch_images = _delta_total(before, after, "diffuserve_batch_size_sum", model)
    depth = [
        v for (n, labels), v in after.items() if n == "diffuserve_queue_depth" and _matches(labels, model)
    ]
    alive = [v for (n, labels), v in after.items() if n == "diffuserve_workers_alive"]
    return ServerDelta(
        requests_by_status={k: round(v) for k, v in sorted(statuses.items()) if round(v)},
        images_generated=round(_delta_total(before, after, "diffuserve_images_generated_total", model)),
        batches=round(batches),
        mean_batch_size=batch_images / batches if batches > 0 else None,
        batch_size_buckets=histogram_buckets(before, after, "diffuserve_batch_size", model),
        mean_queue_ms=_mean_ms(before, after, "diffuserve_queue_seconds", model),
        mean_inference_ms=_mean_ms(before, after, "diffuserve_inference_seconds", model),
        mean_request_ms=_mean_ms(before, after, "diffuserve_request_seconds", model),
        queue_depth_after=sum(depth) if depth else None,
        workers_alive=sum(alive) if alive else None,
    )


def delta_from_text(before: str | None, after: str | None, model: str | None = None) -> ServerDelta | None:
    """None when either scrape failed: a half-known delta would mislead."""
    if before is None or after is None:
        return None
    return server_delta(parse_metrics(before), parse_metrics(after), model)
