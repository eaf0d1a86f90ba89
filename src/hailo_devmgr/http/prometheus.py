"""Prometheus metric families from the daemon's own answers (no state here).

One scrape asks the daemon for ``status``, ``device_status`` and ``metrics``
and turns them into families; prometheus_client renders the text format.
Names are prefixed ``hailo_devmgr_``; times are in seconds, as Prometheus
wants them.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

PREFIX = "hailo_devmgr_"


def _histogram(name: str, documentation: str, histograms: dict) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, documentation, labels=["model_type"])
    for model_type, snapshot in sorted(histograms.items()):
        buckets = [(bound if bound == "+Inf" else str(float(bound) / 1000), count)
                   for bound, count in snapshot["buckets_le_ms"].items()]
        family.add_metric([model_type], buckets, snapshot["sum_ms"] / 1000)
    return family


def families(status: dict, device: dict, metrics: dict) -> Iterable:
    """The metric families of one scrape."""
    by_type = metrics.get("model_types", {})
    requests = CounterMetricFamily(PREFIX + "requests", "Device requests answered, by model type and action",
                                   labels=["model_type", "action"])
    errors = CounterMetricFamily(PREFIX + "errors", "Device requests answered with an error, by code",
                                 labels=["model_type", "code"])
    for model_type, entry in sorted(by_type.items()):
        for action, count in sorted(entry["requests"].items()):
            requests.add_metric([model_type, action], count)
        for code, count in sorted(entry["errors"].items()):
            errors.add_metric([model_type, code], count)
    yield requests
    yield errors
    yield _histogram("queue_wait_seconds", "Time from enqueue until the device started the request",
                     {model_type: entry["queue_wait_ms"] for model_type, entry in by_type.items()})
    yield _histogram("run_seconds", "Time the device spent on the request",
                     {model_type: entry["run_time_ms"] for model_type, entry in by_type.items()})

    queue = GaugeMetricFamily(PREFIX + "queue_depth", "Device requests waiting")
    queue.add_metric([], status.get("queue_depth") or 0)
    yield queue
    loaded = GaugeMetricFamily(PREFIX + "loaded_models", "Models loaded on the device, by type",
                               labels=["model_type"])
    counts: dict[str, int] = {}
    for model in status.get("loaded_models") or []:
        counts[model["model_type"]] = counts.get(model["model_type"], 0) + 1
    for model_type, count in sorted(counts.items()):
        loaded.add_metric([model_type], count)
    yield loaded
    for name, key, documentation in (
            ("evictions", "total_lru_evictions", "Models evicted to make room"),
            ("runtime_faults", "runtime_faults", "Runtime faults (device lost, HailoRT context broken)"),
            ("runtime_recoveries", "runtime_recoveries", "Device rebuilds that succeeded after a fault"),
            ("batched_requests", "batched_requests", "Requests that shared a device call with others "
                                                     "for the same model")):
        counter = CounterMetricFamily(PREFIX + name, documentation)
        counter.add_metric([], status.get(key) or 0)
        yield counter
    up = GaugeMetricFamily(PREFIX + "device_up", "1 while the device is open and usable")
    up.add_metric([], 1 if status.get("device_id") and not status.get("runtime_broken_reason") else 0)
    yield up
    temperature = (device.get("device") or {}).get("temperature_celsius")
    if temperature is not None:
        gauge = GaugeMetricFamily(PREFIX + "device_temperature_celsius", "Chip temperature")
        gauge.add_metric([], temperature)
        yield gauge
    throttled = GaugeMetricFamily(PREFIX + "thermal_throttled", "1 while the thermal guard refuses new work")
    throttled.add_metric([], 1 if status.get("throttled") else 0)
    yield throttled


class Snapshot(Collector):
    """A collector over answers already fetched (one scrape, one registry)."""

    def __init__(self, status: dict, device: dict, metrics: dict):
        self.answers = (status, device, metrics)

    def collect(self):
        return families(*self.answers)
