"""How late the gateway's event loop runs: a task that asks to wake every `interval_s` observes how much later than
asked it woke. Every request's work (admission, dispatch, relaying tokens) waits behind whatever holds the loop, so
a lag that grows under load is the gateway's own share of a latency tail (CPU spent relaying, a slow callback, a
garbage collection, a machine short of cores), told apart from the nodes' and the network's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import Histogram

LAG_INTERVAL_S = 0.05
"""How often the loop is sampled: a lag shorter than the sleep's own jitter (well under 1 ms) reads as 0."""
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


async def watch_loop_lag(
    histogram: Histogram,
    interval_s: float = LAG_INTERVAL_S,
    clock: Callable[[], float] = time.perf_counter,
    rounds: int | None = None,
) -> None:
    """Observe the loop's lag into `histogram` every `interval_s` (`rounds` times; forever when None)."""
    done = 0
    while rounds is None or done < rounds:
        asked = clock()
        await asyncio.sleep(interval_s)
        histogram.observe(max(0.0, clock() - asked - interval_s))
        done += 1


__all__ = ["LAG_BUCKETS", "LAG_INTERVAL_S", "watch_loop_lag"]
