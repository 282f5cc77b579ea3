"""The decision's column work in one compiled pass (numba): every filter, the performance model and every scorer
of a profile built from the stock plugins, for all nodes, without a numpy call per plugin and column.

The column path (`vector.py`, one numpy expression per plugin) costs ~0.5 us of interpreter overhead per array
operation, ~100 us per decision whatever the pool's size; this kernel does the same arithmetic, in the same
order (IEEE, no fast-math), in a few microseconds. Tests check it decides exactly as the column path and the
per-node plugins do. A profile with a plugin the kernel does not know, or a request restricting engines, takes
the column path.

The kernel is compiled once (cached on disk by numba). `warm()` compiles it; until it has, `plan` answers None
so nobody waits for the compiler on a request: the simulator warms it before a run; `schedule` starts a
background compile the first time a pool is large enough for the column path.
"""

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gridserve.scheduler import filters as F
from gridserve.scheduler import scorers as S
from gridserve.scheduler.context import Context
from gridserve.scheduler.profile import Profile
from gridserve.scheduler.snapshot import CLASS_CODES, N_COLUMNS, N_MODEL_COLUMNS

Array = npt.NDArray[np.float64]

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


_PLANS: dict[int, tuple[Profile, Plan | None]] = {}
_ready = threading.Event()
_warming = threading.Lock()


def _plan_of(profile: Profile) -> Plan | None:
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


def plan(profile: Profile, ctx: Context) -> Plan | None:
    """The kernel's plan for this profile and request (None: the column path decides)."""
    if not _ready.is_set() or ctx.model is None or ctx.request.engines:
        return None
    entry = _PLANS.get(id(profile))
    if entry is None or entry[0] is not profile:
        entry = _PLANS[id(profile)] = (profile, _plan_of(profile))  # the profile is kept: its id stays its own
    return entry[1]


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


def run(the_plan: Plan, ctx: Context, rows: Array, model_rows: Array) -> Result:
    assert ctx.model is not None
    req = ctx.request
    allowed = np.array([name in ctx.tier.hw_classes for name in CLASS_CODES], dtype=np.bool_)
    ceiling = req.max_price_per_mtok
    scalars = np.array(
        [
            ctx.now,
            float(req.prompt_tokens + req.max_tokens),
            2.0 * ctx.model.params * max(1, req.prompt_tokens),
            ctx.ttft_slo_s,
            ctx.tpot_slo_s,
            float(max(0, req.max_tokens - 1)),
            ctx.tier.min_tokens_per_s,
            math.nan if ceiling is None else float(ceiling),
            ctx.tier.reference_price_per_mtok,
        ]
    )
    n, k = len(rows), len(the_plan.scorer_codes)
    rejected_by = np.empty(n, dtype=np.int64)
    norms, raws = np.empty((k, n)), np.empty((k, n))
    total, ttft, itl = np.empty(n), np.empty(n), np.empty(n)
    _kernel()(
        np.ascontiguousarray(rows),
        np.ascontiguousarray(model_rows),
        scalars,
        allowed,
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
    )
    return Result(rejected_by, norms, raws, total, ttft, itl)


_COMPILED: list[Any] = []


def _kernel() -> Any:
    if not _COMPILED:
        from gridserve.scheduler._fused_kernel import decide  # numba: imported (and compiled) on first use

        _COMPILED.append(decide)
    return _COMPILED[0]


def warm(background: bool = False) -> None:
    """Compile the kernel (numba caches it on disk: later processes load it) and enable the fused path."""

    def compile_now() -> None:
        with _warming:
            if _ready.is_set():
                return
            _kernel()(
                np.zeros((1, N_COLUMNS)),
                np.zeros((1, N_MODEL_COLUMNS)),
                np.zeros(9),
                np.zeros(len(CLASS_CODES), dtype=np.bool_),
                np.zeros(1, dtype=np.int64),
                np.zeros(1),
                np.zeros(1, dtype=np.int64),
                np.zeros(1),
                np.zeros(1),
                np.empty(1, dtype=np.int64),
                np.empty((1, 1)),
                np.empty((1, 1)),
                np.empty(1),
                np.empty(1),
                np.empty(1),
            )
            _ready.set()

    if background:
        threading.Thread(target=compile_now, name="fused-kernel-warm", daemon=True).start()
    else:
        compile_now()


def warm_soon() -> None:
    """Compile in the background, once (a large pool's first decisions take the column path meanwhile)."""
    if not _ready.is_set() and not _started:
        _started.append(True)
        warm(background=True)


_started: list[bool] = []


def ready() -> bool:
    return _ready.is_set()


def enable(on: bool) -> None:
    """Tests: force the column path (off) or the kernel (on; compiles it if needed)."""
    if on:
        warm()
    else:
        _ready.clear()
