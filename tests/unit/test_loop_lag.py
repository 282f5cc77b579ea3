"""The gateway's event-loop lag sampler (gateway/ops/looplag.py): a callback that holds the loop shows as a lag at
least as long as it held it; a loop left free shows next to none."""

import asyncio
import time

from prometheus_client import CollectorRegistry, Histogram

from gridserve.gateway.ops.looplag import LAG_BUCKETS, watch_loop_lag

INTERVAL_S = 1 / 128
"""(Exact in binary: a fake clock's readings then differ by exactly the interval.)"""
HOLD_S = 0.08


def _histogram() -> Histogram:
    return Histogram("lag_seconds", "test", registry=CollectorRegistry(), buckets=LAG_BUCKETS)


def _observed(histogram: Histogram) -> tuple[float, float]:
    """(count, sum) of what the histogram was given."""
    samples = {s.name: s.value for m in histogram.collect() for s in m.samples}
    return samples["lag_seconds_count"], samples["lag_seconds_sum"]


def test_a_callback_holding_the_loop_shows_as_lag() -> None:
    histogram = _histogram()

    async def go() -> None:
        watcher = asyncio.create_task(watch_loop_lag(histogram, INTERVAL_S, rounds=3))
        await asyncio.sleep(0)  # the watcher asks to wake in INTERVAL_S
        asyncio.get_running_loop().call_soon(time.sleep, HOLD_S)  # a callback that holds the loop
        await watcher

    asyncio.run(go())
    count, total = _observed(histogram)
    assert count == 3
    assert total >= HOLD_S - INTERVAL_S


def test_a_free_loop_shows_no_lag_worth_the_name() -> None:
    histogram = _histogram()
    ticks = iter(float(i) for i in range(100))
    fake = lambda: next(ticks) * INTERVAL_S  # noqa: E731  (each read a whole interval on: no lag at all)
    asyncio.run(watch_loop_lag(histogram, INTERVAL_S, clock=fake, rounds=5))
    assert _observed(histogram) == (5, 0.0)
