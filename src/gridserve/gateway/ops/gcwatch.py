"""Pauses of Python's cyclic garbage collector, as a Prometheus histogram; and the freeze that keeps the grid's
long-lived state out of the collector's reach.

Every pause stops the event loop: heartbeats, tokens and probes all wait. A full (generation 2) collection walks
every tracked object the process holds, so its pause grows with the grid the gateway keeps in memory; this is the
figure to read when heartbeat or token latency spikes with no load to explain it.

What the gateway holds per node comes in two kinds. What a heartbeat changes is kept as plain values that the
collector does not track (gateway/registry/record.py); what a registration builds (the capability document's
models, the record, the reliability ledger's entry, the cached key) lives as long as the node. `Freezer` moves the
latter into the collector's permanent generation (`gc.freeze`) once a burst of registrations is over, so a full
collection walks neither: its pause stays at a few milliseconds whatever the size of the grid.
"""

import gc
import logging
import time
from typing import Any

from prometheus_client import Histogram

log = logging.getLogger("gridserve.gateway")
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Freezer:
    """Freezes what registrations built once they stop coming (or every `batch` of them during a long burst).

    `grew()` is told of each registration; `settle()` runs on the failure detector's tick (several times per
    heartbeat interval) and freezes when registrations came since the last freeze and either none came since the
    previous tick or `batch` have accumulated. A full collection runs first, so no garbage is frozen: what a freeze
    can keep for good is only a cycle among objects alive at that moment that later becomes garbage (a request in
    flight then); freezes follow registrations, not traffic, so that stays small. Off until `enabled` (the gateway
    process turns it on with its GC watch: tests and tools that build a membership do not freeze their process).
    """

    def __init__(self, batch: int = 512) -> None:
        self.batch = batch
        self.enabled = False
        self.pending = 0
        """Registrations since the last freeze."""
        self.recent = False
        """A registration came since the last tick."""
        self.freezes = 0
        self.last_pause_s = 0.0
        """The collection and freeze of the last `settle` that froze."""

    def grew(self) -> None:
        self.pending += 1
        self.recent = True

    def settle(self) -> bool:
        """Freeze if a burst of registrations is over (or long); True if it froze."""
        recent, self.recent = self.recent, False
        if not self.enabled or not self.pending or (recent and self.pending < self.batch):
            return False
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.last_pause_s = time.perf_counter() - started
        self.freezes += 1
        log.debug(
            "froze what %d registrations built: %d objects in the permanent generation (%.1f ms)",
            self.pending,
            gc.get_freeze_count(),
            self.last_pause_s * 1e3,
        )
        self.pending = 0
        return True


FREEZER = Freezer()
"""The process's freezer (one per process: the permanent generation is)."""


class GcWatch:
    """A `gc.callbacks` hook observing each collection's pause by generation (install once, remove at stop).
    Installing it turns the process's `Freezer` on: the gateway process installs it, a test building a membership
    does not."""

    def __init__(self, histogram: Histogram, freezer: Freezer = FREEZER) -> None:
        self.histogram = histogram
        self.freezer = freezer
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
        self.freezer.enabled = True

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        self.freezer.enabled = False
