"""Percentiles for the benchmarks, one definition for all of them."""

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least a share `q` of the values at or below it (p99
    of 100 values is the 99th smallest, not the largest; p50 of 4 is the 2nd). Raises ValueError with none."""
    if not values:
        raise ValueError("no values to take a percentile of")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def percentile_or_none(values: Sequence[float], q: float) -> float | None:
    """`percentile`, or None (JSON null) when there are no values."""
    return percentile(values, q) if values else None
