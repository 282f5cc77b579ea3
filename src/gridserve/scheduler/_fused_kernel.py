"""The compiled kernel behind `fused.py` (numba, cached on disk): the column path's filters and scorers (vector.py,
filters.py, scorers.py) in the same arithmetic and order, and the roofline of perfmodel/roofline.py itself,
compiled from its own functions: the tests compare the paths bit for bit.

numba caches the kernel by this file's timestamp only: after changing perfmodel/roofline.py, or a constant the
kernel reads, delete the cache (`__pycache__/_fused_kernel.*.nb*`) or touch this file."""

# mypy: ignore-errors
# numba is untyped; this module is plain arithmetic over arrays, checked by the tests against the typed paths.

import math

import numba
from numba.extending import overload, register_jitable

from gridserve.perfmodel import roofline
from gridserve.scheduler.scorers import PRIOR_RELIABILITY
from gridserve.scheduler.snapshot import (
    C_ACTIVE,
    C_BLOCKING,
    C_CAL_ITL,
    C_CAL_OUT,
    C_CAL_TTFT,
    C_CLOCK,
    C_HAS_HW,
    C_HEARTBEAT,
    C_INTERLEAVED,
    C_MEMORY,
    C_PREFILL_EFF,
    C_QUEUED,
    C_REL_PROBATION,
    C_REL_SCORE,
    C_SERVING,
    C_SLOTS,
    C_TEMP,
    C_TFLOPS,
    C_TIER_BW,
    C_TIER_TFLOPS,
    M_BASE_ITL,
    M_CONTEXT,
    M_DTYPE_OK,
    M_KV_FULL_LAYERS,
    M_KV_SLIDING_LAYERS,
    M_KV_WINDOW,
    M_LISTED,
    M_LOAD_S,
    M_MEM_WEIGHTS,
    M_PRICE,
    M_RESIDENT,
)


@overload(roofline.where)
def _where(cond, a, b):
    """One value: the branch (the roofline's `where` is elementwise on columns)."""

    def one(cond, a, b):
        if cond:
            return a
        return b

    return one


@overload(roofline.minimum)
def _minimum(a, b):
    return lambda a, b: min(a, b)


@overload(roofline.maximum)
def _maximum(a, b):
    return lambda a, b: max(a, b)


for _formula in (roofline.throttle, roofline.unloaded, roofline.moe_factor, roofline.under_load):
    register_jitable(_formula)  # compiled from the roofline's own source (LLVM inlines them)

# scalars: now, tokens (prompt + max), prefill work (2 x active params x prompt), ttft slo, tpot slo, decode tokens
# after the first, tier floor tokens/s, price ceiling (NaN: none), tier reference price, and the model's
# mixture-of-experts terms (roofline.moe_terms: zeros for a dense model)
(
    NOW,
    TOKENS,
    WORK,
    TTFT_SLO,
    TPOT_SLO,
    AFTER_FIRST,
    FLOOR,
    CEILING,
    REF_PRICE,
    EXPERTS,
    PER_TOKEN,
    ROUTED,
    MIN_BW,
    MIN_TFLOPS,
) = range(14)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _inverse(ratio):
    if ratio < 0.0:  # NaN stays NaN
        ratio = 0.0
    return 1.0 / (1.0 + ratio)


@numba.njit(cache=True, error_model="numpy")
def decide(
    rows,
    mrows,
    scalars,
    filter_codes,
    filter_params,
    scorer_codes,
    scorer_weights,
    scorer_params,
    rejected_by,
    norms,
    raws,
    total,
    ttft_out,
    itl_out,
    queue_out,
    alone_out,
    prefill_out,
):
    n = rows.shape[0]
    for j in range(n):
        row = rows[j]
        m = mrows[j]
        # the performance model (perfmodel.roofline, as vector._predict reads the columns)
        ok = row[C_HAS_HW] > 0
        speed = roofline.throttle(row[C_CLOCK], row[C_TEMP])
        itl0, prefill = roofline.unloaded(
            scalars[WORK], m[M_BASE_ITL], row[C_TFLOPS] * 1e12 * row[C_PREFILL_EFF], speed
        )
        slots = max(1.0, row[C_SLOTS])
        ttft, itl, queue = roofline.under_load(
            itl0,
            prefill,
            slots,
            row[C_ACTIVE],
            row[C_QUEUED],
            row[C_CAL_TTFT],
            row[C_CAL_ITL],
            m[M_LOAD_S],
            row[C_CAL_OUT],
            row[C_INTERLEAVED],
            scalars[EXPERTS],
            scalars[PER_TOKEN],
            scalars[ROUTED],
        )
        if not ok:
            ttft, itl, queue = math.nan, math.nan, math.nan
        ttft_out[j] = ttft
        itl_out[j] = itl
        queue_out[j] = queue
        alone_out[j] = itl0
        prefill_out[j] = prefill
        # filters: the first that rejects names the reason
        rejected_by[j] = -1
        for f in range(len(filter_codes)):
            code = filter_codes[f]
            if code == 0:
                hit = row[C_SERVING] == 0 or row[C_BLOCKING] > 0
            elif code == 1:
                hit = scalars[NOW] - row[C_HEARTBEAT] > filter_params[f]
            elif code == 2:
                hit = m[M_LISTED] == 0
            elif code == 3:
                hit = scalars[TOKENS] > m[M_CONTEXT]
            elif code == 4:
                hit = False  # engine restrictions take the column path
            elif code == 5:
                hit = m[M_DTYPE_OK] == 0
            elif code == 6:
                hit = not (row[C_TIER_BW] >= scalars[MIN_BW] and row[C_TIER_TFLOPS] >= scalars[MIN_TFLOPS])
            elif code == 7:  # filters.MemoryFitFilter._need: one sequence's KV, sliding layers within their window
                tokens = scalars[TOKENS]
                windowed = min(tokens, m[M_KV_WINDOW])
                kv = m[M_KV_FULL_LAYERS] * tokens + m[M_KV_SLIDING_LAYERS] * windowed
                need = (m[M_MEM_WEIGHTS] + kv) * (1 + filter_params[f])
                hit = row[C_MEMORY] > 0 and need > row[C_MEMORY]
            elif code == 8:
                floor = scalars[FLOOR]
                if floor > 0 and ok:  # capability: the node at rest
                    rest = roofline.under_load(
                        itl0,
                        prefill,
                        slots,
                        0.0,
                        0.0,
                        row[C_CAL_TTFT],
                        row[C_CAL_ITL],
                        m[M_LOAD_S],
                        row[C_CAL_OUT],
                        row[C_INTERLEAVED],
                        scalars[EXPERTS],
                        scalars[PER_TOKEN],
                        scalars[ROUTED],
                    )
                    hit = rest[1] * floor > 1.0
                else:
                    hit = False
            else:
                price = m[M_PRICE]
                hit = not math.isnan(scalars[CEILING]) and not math.isnan(price) and price > scalars[CEILING]
            if hit:
                rejected_by[j] = f
                break
        # scorers, summed in the profile's order
        t = 0.0
        for s in range(len(scorer_codes)):
            code = scorer_codes[s]
            if code == 0:
                score = row[C_REL_SCORE]
                base = PRIOR_RELIABILITY if math.isnan(score) else score
                value = base * (scorer_params[s] if row[C_REL_PROBATION] > 0 else 1.0)
                norm, raw = min(max(value, 0.0), 1.0), base
            elif code == 1:
                if math.isnan(ttft):
                    norm, raw = 0.5, -1.0
                else:
                    norm = 0.5 * _inverse(ttft / scalars[TTFT_SLO]) + 0.5 * _inverse(itl / scalars[TPOT_SLO])
                    raw = ttft + itl * scalars[AFTER_FIRST]
            elif code == 2:
                load = row[C_ACTIVE] + row[C_QUEUED]
                card = row[C_SLOTS] if row[C_HAS_HW] > 0 else 1.0
                norm, raw = _inverse(load / max(1.0, card)), load
            elif code == 3:
                price = m[M_PRICE]
                if math.isnan(price):
                    norm, raw = 0.5, -1.0
                else:
                    norm, raw = _inverse(price / scalars[REF_PRICE]), price
            else:
                resident = m[M_RESIDENT] > 0
                norm = 1.0 if resident else scorer_params[s]
                raw = 1.0 if resident else 0.0
            norms[s, j] = norm
            raws[s, j] = raw
            t = t + norm * scorer_weights[s]
        total[j] = t
