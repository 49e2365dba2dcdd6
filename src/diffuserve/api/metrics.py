"""Prometheus metrics of one server, in its own registry (so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from diffuserve.types import JobState, Priority

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
    160,
    320,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "diffuserve_requests",
            "Image generation requests by final status",
            ["model", "status"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "diffuserve_queue_seconds",
            "Time a request waited before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "diffuserve_inference_seconds",
            "Pipeline time of the batch a request ran in",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Histogram(
            "diffuserve_phase_seconds",
            "Where a request's time went: queue, denoise (text encoders and denoising), decode (VAE to uint8 "
            "pixels in host memory), encode, transfer (between the API and the worker), respond (the body)",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "diffuserve_request_seconds",
            "Total time from request received to response",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "diffuserve_batch_size", "Images per batch sent to a worker", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth_gauge = Gauge(
            "diffuserve_queue_depth", "Requests waiting for a worker", ["model"], registry=r
        )
        self.queue_depth_by_priority = Gauge(
            "diffuserve_queue_depth_by_priority",
            "Requests waiting for a worker, by priority class",
            ["model", "priority"],
            registry=r,
        )
        self.priority_queue_seconds = Histogram(
            "diffuserve_priority_queue_seconds",
            "Time a request waited before its batch started, by priority class",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preempted = Counter(
            "diffuserve_preempted_requests",
            "Requests of batch priority whose running batch was stopped for an interactive request",
            registry=r,
        )
        self.jobs = Gauge(
            "diffuserve_jobs", "Unfinished jobs by state: queued, running", ["state"], registry=r
        )
        self.jobs_finished = Counter(
            "diffuserve_jobs_finished", "Jobs that reached a final state, by state", ["state"], registry=r
        )
        self.webhooks = Counter(
            "diffuserve_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retried (the receiver failed), given_up",
            ["outcome"],
            registry=r,
        )
        self.images = Counter(
            "diffuserve_images_generated", "Images generated and returned", ["model"], registry=r
        )
        self.workers_alive = Gauge(
            "diffuserve_workers_alive", "Worker processes loaded and serving", registry=r
        )
        self.worker_devices = Gauge(
            "diffuserve_worker_devices",
            "Devices of each worker (a worker group runs one pipeline on several)",
            ["worker", "devices", "model"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "diffuserve_worker_restarts", "Workers replaced after dying", registry=r
        )
        self.watchdog_kills = Counter(
            "diffuserve_watchdog_kills",
            "Workers killed by the watchdog because a batch ran far past its expected time",
            registry=r,
        )

        self.adapter_requests = Counter(
            "diffuserve_adapter_requests",
            "Requests that applied an adapter (LoRA), by adapter",
            ["model", "adapter"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "diffuserve_adapter_loads",
            "Adapters read from their files into a worker's cache (a cache miss), by adapter",
            ["model", "adapter"],
            registry=r,
        )
        self.adapter_cache_hits = Counter(
            "diffuserve_adapter_cache_hits",
            "Batches that found an adapter in their worker's cache, by adapter",
            ["model", "adapter"],
            registry=r,
        )
        self.prompt_cache = Counter(
            "diffuserve_prompt_cache",
            "Prompts whose text-encoder outputs a worker took from its prompt cache (hit) or encoded (miss)",
            ["model", "outcome"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "diffuserve_adapter_load_seconds",
            "Time to read an adapter's file into a worker's cache",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def observer_for(self, model: str) -> ModelObserver:
        """The hooks of one model's scheduler (a SchedulerObserver): its queue depth is its own."""
        return ModelObserver(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JobMetrics:
    """A JobObserver: jobs by state, finished jobs and webhook deliveries."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        for state in JobState:
            if not state.final:
                metrics.jobs.labels(state.value).set(0)

    def job_moved(self, old: str | None, new: str | None, final: bool) -> None:
        if old is not None:
            self.metrics.jobs.labels(old).dec()
        if new is not None and not final:
            self.metrics.jobs.labels(new).inc()
        if new is not None and final:
            self.metrics.jobs_finished.labels(new).inc()

    def webhook(self, outcome: str) -> None:
        self.metrics.webhooks.labels(outcome).inc()


class ModelObserver:
    """A SchedulerObserver for one model: the queue depth labelled with it; batches and waits pooled."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        metrics.queue_depth_gauge.labels(model).set(0)

    def queue_depth(self, depth: int, by_priority: dict[Priority, int]) -> None:
        self.metrics.queue_depth_gauge.labels(self.model).set(depth)
        for priority, count in by_priority.items():
            self.metrics.queue_depth_by_priority.labels(self.model, priority.value).set(count)

    def batch_started(self, images: int, waits_s: list[float], priorities: list[Priority]) -> None:
        self.metrics.batch_size.observe(images)
        for wait, priority in zip(waits_s, priorities, strict=True):
            self.metrics.queue_seconds.observe(wait)
            self.metrics.priority_queue_seconds.labels(priority.value).observe(wait)

    def preempted(self, requests: int) -> None:
        self.metrics.preempted.inc(requests)

    def adapters_used(self, loaded: dict[str, float], hits: list[str]) -> None:
        for name, seconds in loaded.items():
            self.metrics.adapter_loads.labels(self.model, name).inc()
            self.metrics.adapter_load_seconds.observe(seconds)
        for name in hits:
            self.metrics.adapter_cache_hits.labels(self.model, name).inc()

    def prompts_encoded(self, hits: int, misses: int) -> None:
        self.metrics.prompt_cache.labels(self.model, "hit").inc(hits)
        self.metrics.prompt_cache.labels(self.model, "miss").inc(misses)
