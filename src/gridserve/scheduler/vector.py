"""The vectorised evaluation of a decision: the same filters, predictions and scores as the per-node plugin
code, computed over columns (numpy) for every node at once. `core.schedule` uses it when every plugin of the
profile has a vector form; tests check that both give the same decision."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gridserve.perfmodel import pricing, roofline
from gridserve.scheduler.context import Context
from gridserve.scheduler.snapshot import (
    C_ACTIVE,
    C_BANDWIDTH,
    C_CAL_ITL,
    C_CAL_TTFT,
    C_CLOCK,
    C_COST,
    C_DECODE_EFF,
    C_HAS_HW,
    C_OP_PRICE,
    C_PREFILL_EFF,
    C_QUEUED,
    C_SLOTS,
    C_TEMP,
    C_TFLOPS,
    M_PRED_BPP,
    M_PRICE_BPP,
    M_RESIDENT,
    N_COLUMNS,
    N_MODEL_COLUMNS,
    NodeSnapshot,
)
from gridserve.scheduler.table import SnapshotTable

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


@dataclass
class Columns:
    nodes: list[NodeSnapshot]
    rows: Array
    """One row per node: NodeSnapshot.row."""
    model: Array
    """One row per node: NodeStatic.model_row(request model)."""
    _cache: dict[str, Any]

    @classmethod
    def of(cls, ctx: Context, nodes: "Sequence[NodeSnapshot]") -> "Columns":
        model = ctx.request.model
        if isinstance(nodes, SnapshotTable):
            return cls(nodes.snapshots(), nodes.rows(), nodes.model_rows(model), {})
        nodes = list(nodes)
        n = len(nodes)
        rows = np.frombuffer(b"".join([node.row for node in nodes]), dtype=np.float64).reshape(n, N_COLUMNS)
        mrows = np.frombuffer(b"".join([node.static.model_row(model) for node in nodes]), dtype=np.float64)
        mrows = mrows.reshape(n, N_MODEL_COLUMNS)
        return cls(nodes, rows, mrows, {})

    def col(self, index: int) -> Array:
        return self.rows[:, index]

    def mcol(self, index: int) -> Array:
        return self.model[:, index]

    def cached(self, key: str, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def predictable(self, ctx: Context) -> Mask:
        """Nodes for which a prediction exists (model in the catalogue, hardware known)."""
        if ctx.model is None:
            return np.zeros(len(self.nodes), dtype=bool)
        return np.asarray(self.col(C_HAS_HW) > 0)

    def prediction(self, ctx: Context, *, loaded: bool) -> tuple[Array, Array]:
        """(TTFT, ITL) per node, as perfmodel.predict computes them (NaN where there is no prediction)."""
        return self.cached(f"pred{loaded}", lambda: _predict(self, ctx, loaded))  # type: ignore[no-any-return]

    def price(self, ctx: Context) -> Array:
        """USD per Mtok (NaN = unknown), as Context.price computes it."""
        return self.cached("price", lambda: _price(self, ctx))  # type: ignore[no-any-return]


def _base_itl(c: Columns, ctx: Context, bpp: Array) -> Array:
    assert ctx.model is not None
    return ctx.model.params * bpp / (c.col(C_BANDWIDTH) * 1e9 * c.col(C_DECODE_EFF))


def _base(c: Columns, ctx: Context) -> tuple[Mask, Array, Array, Array, Array]:
    """The load-independent part: predictable mask, throttle speed, throttled ITL, prefill, batch slots."""
    assert ctx.model is not None
    clock, temp = c.col(C_CLOCK), c.col(C_TEMP)
    has_clock = clock > 0  # NaN compares False
    hot = temp >= roofline.THROTTLE_TEMP_C
    speed = np.where(has_clock, np.minimum(1.0, clock), np.where(hot, roofline.THROTTLE_FACTOR, 1.0))
    itl = _base_itl(c, ctx, c.mcol(M_PRED_BPP)) / speed
    prompt = max(1, ctx.request.prompt_tokens)
    prefill = 2.0 * ctx.model.params * prompt / (c.col(C_TFLOPS) * 1e12 * c.col(C_PREFILL_EFF) * speed)
    return c.predictable(ctx), itl, prefill, np.maximum(1.0, c.col(C_SLOTS)), speed


def _predict(c: Columns, ctx: Context, loaded: bool) -> tuple[Array, Array]:
    n = len(c.nodes)
    if ctx.model is None or not c.predictable(ctx).any():
        return np.full(n, np.nan), np.full(n, np.nan)
    ok, itl, prefill, slots, _ = c.cached("base", lambda: _base(c, ctx))
    active = c.col(C_ACTIVE) if loaded else np.zeros(n)
    queued = c.col(C_QUEUED) if loaded else np.zeros(n)
    running = active + 1
    growth = roofline.BATCH_ITL_GROWTH
    itl = np.where(
        running <= slots, itl * (1.0 + growth * (running - 1)), itl * ((1.0 + growth * (slots - 1)) * running / slots)
    )
    ttft = (roofline.PREFILL_FIXED_S + prefill + itl) * c.col(C_CAL_TTFT)
    itl = itl * c.col(C_CAL_ITL)
    waiting = queued + np.maximum(0.0, active + 1 - slots)
    queue = np.where(waiting > 0, waiting * (ttft + itl * roofline.TYPICAL_OUTPUT_TOKENS) / slots, 0.0)
    weights = ctx.model.params * c.mcol(M_PRED_BPP)
    loading = np.where(c.mcol(M_RESIDENT) > 0, 0.0, weights / (roofline.LOAD_BANDWIDTH_GBS * 1e9))
    ttft = ttft + queue + loading
    return np.where(ok, ttft, np.nan), np.where(ok, itl, np.nan)


def _price(c: Columns, ctx: Context) -> Array:
    operator = c.col(C_OP_PRICE)
    fallback = np.where(operator != 0, operator, np.nan)  # no catalogue data: the operator's price or unknown
    ok = c.predictable(ctx)
    if not ok.any():
        return fallback
    base = _base_itl(c, ctx, c.mcol(M_PRICE_BPP))
    tokens_per_s = np.maximum(1.0, c.col(C_SLOTS)) / base
    derived = c.col(C_COST) / (tokens_per_s * 3600.0) * 1e6 * pricing.MARGIN
    clamped = np.minimum(np.maximum(operator, derived * pricing.MIN_OVERRIDE), derived * pricing.MAX_OVERRIDE)
    effective = np.where(operator <= 0.0, derived, clamped)
    return np.where(ok, effective, fallback)
