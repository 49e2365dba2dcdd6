"""Scrape-time metrics: each worker's state, and GPU memory and utilisation through NVML (a stand-in here)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from diffuserve.api.device_metrics import GpuCollector, WorkerStateCollector


def scrape(collector: Any) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_each_worker_has_one_state_at_one() -> None:
    workers = [{"id": 0, "state": "busy"}, {"id": 1, "state": "dead"}]
    text = scrape(WorkerStateCollector(lambda: workers))
    assert 'diffuserve_worker_state{state="busy",worker="0"} 1.0' in text
    assert 'diffuserve_worker_state{state="idle",worker="0"} 0.0' in text
    assert 'diffuserve_worker_state{state="dead",worker="1"} 1.0' in text


def test_gpu_memory_and_utilisation_come_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 2**30, total=141 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87 if h == 0 else 0),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    collector = GpuCollector()
    assert collector.available
    text = scrape(collector)
    values = {
        (sample.name, sample.labels["gpu"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert values[("diffuserve_gpu_memory_used_bytes", "1")] == 2 * 2**30
    assert values[("diffuserve_gpu_memory_total_bytes", "0")] == 141 * 2**30
    assert values[("diffuserve_gpu_utilization_percent", "0")] == 87
    assert 'name="NVIDIA H200"' in text


def test_without_nvml_there_are_no_gpu_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=no_driver))
    collector = GpuCollector()
    assert not collector.available
    assert "diffuserve_gpu" not in scrape(collector)
