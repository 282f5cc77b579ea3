"""The vectorised evaluation of a decision: the same filters, predictions and scores as the per-node plugin
code, computed over columns (numpy) for every node at once. `core.schedule` uses it when every plugin of the
profile has a vector form; tests check that both give the same decision."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gridserve.perfmodel import roofline
from gridserve.scheduler.context import Context
from gridserve.scheduler.snapshot import (
    C_ACTIVE,
    C_CAL_ITL,
    C_CAL_TTFT,
    C_CLOCK,
    C_HAS_HW,
    C_PREFILL_EFF,
    C_QUEUED,
    C_SLOTS,
    C_TEMP,
    C_TFLOPS,
    M_BASE_ITL,
    M_LOAD_S,
    M_PRICE,
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

    def set_prediction(self, ttft: Array, itl: Array) -> None:
        """Predictions computed elsewhere (the fused kernel) for the request under the nodes' load."""
        self._cache["predTrue"] = (ttft, itl)

    def price(self, ctx: Context) -> Array:
        """USD per Mtok (NaN = unknown), as Context.price computes it."""
        return self.cached("price", lambda: _price(self, ctx))  # type: ignore[no-any-return]


def _base(c: Columns, ctx: Context) -> tuple[Mask, Array, Array, Array]:
    """The load-independent part: predictable mask, throttled ITL, prefill, batch slots."""
    assert ctx.model is not None
    clock = c.col(C_CLOCK)
    speed = np.where(clock > 0, np.minimum(1.0, clock), 1.0)  # NaN compares False
    hot = c.col(C_TEMP) >= roofline.THROTTLE_TEMP_C
    if hot.any():  # a hot card that reports no clock ratio runs at the throttle factor
        speed = np.where(hot & ~(clock > 0), roofline.THROTTLE_FACTOR, speed)
    itl = c.mcol(M_BASE_ITL) / speed
    prompt = max(1, ctx.request.prompt_tokens)
    prefill = 2.0 * ctx.model.params * prompt / (c.col(C_TFLOPS) * 1e12 * c.col(C_PREFILL_EFF) * speed)
    return c.predictable(ctx), itl, prefill, np.maximum(1.0, c.col(C_SLOTS))


def _predict(c: Columns, ctx: Context, loaded: bool) -> tuple[Array, Array]:
    n = len(c.nodes)
    if ctx.model is None or not c.predictable(ctx).any():
        return np.full(n, np.nan), np.full(n, np.nan)
    ok, itl, prefill, slots = c.cached("base", lambda: _base(c, ctx))
    growth = roofline.BATCH_ITL_GROWTH
    if loaded:
        active = c.col(C_ACTIVE)
        running = active + 1
        itl = np.where(
            running <= slots,
            itl * (1.0 + growth * active),
            itl * ((1.0 + growth * (slots - 1)) * running / slots),
        )
    ttft = (roofline.PREFILL_FIXED_S + prefill + itl) * c.col(C_CAL_TTFT)
    itl = itl * c.col(C_CAL_ITL)
    if loaded:
        waiting = c.col(C_QUEUED) + np.maximum(0.0, active + 1 - slots)
        queue = waiting * (ttft + itl * roofline.TYPICAL_OUTPUT_TOKENS) / slots  # 0 when nothing waits
        ttft = ttft + queue
    ttft = ttft + c.mcol(M_LOAD_S)
    return np.where(ok, ttft, np.nan), np.where(ok, itl, np.nan)


def _price(c: Columns, ctx: Context) -> Array:
    return np.array(c.mcol(M_PRICE))  # a copy: the column may be a view of a table that changes later
