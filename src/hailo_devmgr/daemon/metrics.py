"""Counters and latency histograms behind the `metrics` action.

Per model type: requests, errors by code, and two histograms kept apart,
queue wait (enqueued until the device started it) and run time (on the
device). Updated and read on the event loop only, so no lock.
"""
from __future__ import annotations

import bisect
from collections import Counter, defaultdict

# Upper bounds of the histogram buckets, in milliseconds (Prometheus-style "le").
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, 120000)


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS_MS) + 1)   # the last one is +Inf
        self.count = 0
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_MS, ms)] += 1
        self.count += 1
        self.sum_ms += ms

    def snapshot(self) -> dict:
        cumulative, buckets = 0, {}
        for bound, count in zip((*BUCKETS_MS, "+Inf"), self.counts):
            cumulative += count
            buckets[str(bound)] = cumulative
        return {"count": self.count, "sum_ms": round(self.sum_ms, 3), "buckets_le_ms": buckets}


class _TypeMetrics:
    def __init__(self):
        self.requests: Counter = Counter()      # by action
        self.errors: Counter = Counter()        # by code
        self.queue_wait = Histogram()
        self.run_time = Histogram()


class Metrics:
    def __init__(self):
        self._by_type: dict[str, _TypeMetrics] = defaultdict(_TypeMetrics)

    def observe(self, action: str, model_type: str, job, error_code: str | None) -> None:
        """One finished device request; ``job`` carries its timestamps."""
        entry = self._by_type[model_type]
        entry.requests[action] += 1
        if error_code is not None:
            entry.errors[error_code] += 1
        if job.started_at is not None:
            entry.queue_wait.observe((job.started_at - job.enqueued_at) * 1000)
            if job.finished_at is not None:
                entry.run_time.observe((job.finished_at - job.started_at) * 1000)

    def snapshot(self) -> dict:
        return {
            "model_types": {
                model_type: {
                    "requests": dict(entry.requests),
                    "errors": dict(entry.errors),
                    "queue_wait_ms": entry.queue_wait.snapshot(),
                    "run_time_ms": entry.run_time.snapshot(),
                }
                for model_type, entry in sorted(self._by_type.items())
            },
            "buckets_ms": list(BUCKETS_MS),
        }
