"""Pauses of Python's cyclic garbage collector, as a Prometheus histogram.

Every pause stops the event loop: heartbeats, tokens and probes all wait. A full (generation 2) collection walks
every tracked object the process holds, so its pause grows with the grid the gateway keeps in memory; this is the
figure to read when heartbeat or token latency spikes with no load to explain it.
"""

import gc
import time
from typing import Any

from prometheus_client import Histogram

GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GcWatch:
    """A `gc.callbacks` hook observing each collection's pause by generation (install once, remove at stop)."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started:
            self.histogram.labels(generation=str(info.get("generation", "?"))).observe(
                time.perf_counter() - self.started
            )
            self.started = 0.0

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
