"""Metrics read at scrape time: each worker's state, and each GPU's memory and utilisation (NVML)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from diffuserve.serving.service import WorkerState

log = logging.getLogger(__name__)

WORKER_STATES = tuple(state.value for state in WorkerState)


class WorkerStateCollector(Collector):
    """`diffuserve_worker_state{worker,state}`: 1 for the state each worker is in, 0 for the others."""

    def __init__(self, describe_workers: Callable[[], list[dict[str, Any]]]) -> None:
        self._describe = describe_workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "diffuserve_worker_state",
            "Each worker's state (1 for the current one)",
            labels=["worker", "state"],
        )
        for worker in self._describe():
            for state in WORKER_STATES:
                family.add_metric([str(worker["id"]), state], 1.0 if worker["state"] == state else 0.0)
        yield family


class GpuCollector(Collector):
    """Per GPU of the host: memory used and total (bytes) and utilisation (%), through NVML (the
    `nvidia-ml-py` package of the gpu extra). The API process imports no torch, so NVML is how it sees the
    cards; without NVML or a GPU it reports nothing."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no package, no driver, no GPU: a CPU server has nothing to report
            log.debug("no GPU metrics: %s", exc)
            return
        self._nvml = pynvml

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._nvml is None:
            return
        nvml = self._nvml
        used = GaugeMetricFamily(
            "diffuserve_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"]
        )
        total = GaugeMetricFamily("diffuserve_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "name"])
        busy = GaugeMetricFamily(
            "diffuserve_gpu_utilization_percent",
            "Share of the last sample period in which a kernel ran on the GPU",
            labels=["gpu", "name"],
        )
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                labels = [str(index), name]
                used.add_metric(labels, float(memory.used))
                total.add_metric(labels, float(memory.total))
                busy.add_metric(labels, float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        except Exception as exc:  # a card gone away must not break /metrics
            log.warning("GPU metrics unavailable: %s", exc)
            return
        yield from (used, total, busy)
