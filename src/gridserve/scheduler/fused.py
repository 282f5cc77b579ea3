"""The decision's column work in one compiled pass (numba): every filter, the performance model and every scorer
of a profile built from the stock plugins, for all nodes, without a numpy call per plugin and column.

Why it stays: at the default sample size (256 nodes) the column path (`vector.py`, one numpy expression per
plugin, ~0.5 us of interpreter overhead per array operation) spends about half of a decision's time in those
calls; this kernel does the same arithmetic, in the same order (IEEE, no fast-math), in a few microseconds
(bench/scheduler.py, with and without `--no-kernel`). Tests check it decides bit for bit as the column path.

The kernel knows the stock plugins by hand-numbered codes (`_FILTERS`, `_SCORERS`); a profile with any other
plugin, or a request restricting engines, takes the column path, so a new plugin works without touching this
file (generating the kernel from the plugins' own declarations is left for later). The roofline inside it is
`perfmodel.roofline`'s, compiled (see `_fused_kernel.py`).

Nothing here holds state: a `Scheduler` owns its plan and its compiled kernel (`compile_kernel`, which numba
caches on disk so that later processes load it).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gridserve.perfmodel import roofline
from gridserve.scheduler import filters as F
from gridserve.scheduler import scorers as S
from gridserve.scheduler.context import Context
from gridserve.scheduler.profile import Profile
from gridserve.scheduler.snapshot import N_COLUMNS, N_MODEL_COLUMNS

Array = npt.NDArray[np.float64]
Kernel = Callable[..., None]
"""The compiled `_fused_kernel.decide`."""

_FILTERS: dict[type, int] = {
    F.NodeStateFilter: 0,
    F.TelemetryFreshnessFilter: 1,
    F.ModelServedFilter: 2,
    F.ContextFitFilter: 3,
    F.RuntimeFilter: 4,
    F.DtypeFilter: 5,
    F.TierHardwareFilter: 6,
    F.MemoryFitFilter: 7,
    F.ThroughputFloorFilter: 8,
    F.PriceCeilingFilter: 9,
}
_SCORERS: dict[type, int] = {
    S.ReliabilityScorer: 0,
    S.LatencyScorer: 1,
    S.LoadScorer: 2,
    S.PriceScorer: 3,
    S.WarmScorer: 4,
}


@dataclass(frozen=True)
class Plan:
    """A profile's plugins as the kernel's codes and parameters."""

    filter_codes: "npt.NDArray[np.int64]"
    filter_params: Array
    scorer_codes: "npt.NDArray[np.int64]"
    scorer_weights: Array
    scorer_params: Array


def _filter_param(filt: Any) -> float:
    if isinstance(filt, F.TelemetryFreshnessFilter):
        return float(filt.max_age_s)
    if isinstance(filt, F.MemoryFitFilter):
        return float(filt.margin)
    return 0.0


def _scorer_param(scorer: Any) -> float:
    if isinstance(scorer, S.ReliabilityScorer):
        return float(scorer.probation_factor)
    if isinstance(scorer, S.WarmScorer):
        return float(scorer.cold)
    return 0.0


def plan_of(profile: Profile) -> Plan | None:
    """The kernel's plan for this profile (None: a plugin the kernel does not know; the column path decides)."""
    if any(type(f) not in _FILTERS for f in profile.filters) or any(
        type(sc) not in _SCORERS for sc, _ in profile.scorers
    ):
        return None
    return Plan(
        np.array([_FILTERS[type(f)] for f in profile.filters], dtype=np.int64),
        np.array([_filter_param(f) for f in profile.filters], dtype=np.float64),
        np.array([_SCORERS[type(sc)] for sc, _ in profile.scorers], dtype=np.int64),
        np.array([float(w) for _, w in profile.scorers], dtype=np.float64),
        np.array([_scorer_param(sc) for sc, _ in profile.scorers], dtype=np.float64),
    )


def applies(ctx: Context) -> bool:
    """The kernel decides this request: a generation (its model column lists offers for generation only) of a
    catalogue model (it predicts), no engine restriction (strings) and no prefix-cache hit (the kernel predicts
    one prefill for every node; the columns take each node's own)."""
    req = ctx.request
    return (
        req.task == "generate"
        and ctx.model is not None
        and not req.engines
        and not req.features
        and not req.cached_tokens
    )


@dataclass
class Result:
    rejected_by: "npt.NDArray[np.int64]"
    norms: Array
    """One row per scorer."""
    raws: Array
    total: Array
    ttft: Array
    """Predicted under the node's load (NaN: no prediction)."""
    itl: Array
    queue: Array
    """Predicted seconds waiting for a batch slot (NaN: no prediction)."""
    alone: Array
    prefill: Array
    """ITL and prefill seconds at rest, throttled, uncalibrated (`roofline.unloaded`, every node)."""


def run(kernel: Kernel, the_plan: Plan, ctx: Context, rows: Array, model_rows: Array) -> Result:
    assert ctx.model is not None
    req = ctx.request
    ceiling = req.max_price_per_mtok
    scalars = np.array(
        [
            ctx.now,
            float(req.prompt_tokens + req.max_tokens),
            2.0 * ctx.model.token_params * max(1, req.prompt_tokens),
            ctx.ttft_slo_s,
            ctx.tpot_slo_s,
            float(max(0, req.max_tokens - 1)),
            ctx.tier.min_tokens_per_s,
            math.nan if ceiling is None else float(ceiling),
            ctx.tier.reference_price_per_mtok,
            *roofline.moe_terms(ctx.model),
            ctx.tier.min_bandwidth_gbs,
            ctx.tier.min_fp16_tflops,
        ]
    )
    n, k = len(rows), len(the_plan.scorer_codes)
    rejected_by = np.empty(n, dtype=np.int64)
    norms, raws = np.empty((k, n)), np.empty((k, n))
    total, ttft, itl, queue, alone, prefill = (np.empty(n) for _ in range(6))
    kernel(
        np.ascontiguousarray(rows),
        np.ascontiguousarray(model_rows),
        scalars,
        the_plan.filter_codes,
        the_plan.filter_params,
        the_plan.scorer_codes,
        the_plan.scorer_weights,
        the_plan.scorer_params,
        rejected_by,
        norms,
        raws,
        total,
        ttft,
        itl,
        queue,
        alone,
        prefill,
    )
    return Result(rejected_by, norms, raws, total, ttft, itl, queue, alone, prefill)


def compile_kernel() -> Kernel:
    """Import numba and compile the kernel (or load it from numba's disk cache), ready for `run`. Seconds the
    first time on a machine; call it before traffic (`Scheduler.warm`), never on a request."""
    from gridserve.scheduler._fused_kernel import decide  # numba: imported only by those who compile

    decide(
        np.zeros((1, N_COLUMNS)),
        np.zeros((1, N_MODEL_COLUMNS)),
        np.zeros(14),
        np.zeros(1, dtype=np.int64),
        np.zeros(1),
        np.zeros(1, dtype=np.int64),
        np.zeros(1),
        np.zeros(1),
        np.empty(1, dtype=np.int64),
        np.empty((1, 1)),
        np.empty((1, 1)),
        *(np.empty(1) for _ in range(6)),
    )
    return decide
