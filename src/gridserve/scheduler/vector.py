"""The columns a decision is computed over: one row per node (its snapshot's `row`, C_*) and one per-model row
(`NodeStatic.model_row`, M_*), and the per-decision figures every plugin shares (the roofline prediction, the
price), computed once per decision over all rows. Filters and scorers are written over these columns; a single
node is the one-row case."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from gridserve.perfmodel import roofline
from gridserve.scheduler.context import Context
from gridserve.scheduler.snapshot import (
    C_ACTIVE,
    C_CAL_ITL,
    C_CAL_OUT,
    C_CAL_TTFT,
    C_CLOCK,
    C_HAS_HW,
    C_INTERLEAVED,
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
T = TypeVar("T")


@dataclass
class Columns:
    nodes: Sequence[NodeSnapshot]
    rows: Array
    """One row per node: NodeSnapshot.row."""
    model: Array
    """One row per node: NodeStatic.model_row(request model)."""
    _cache: dict[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, ctx: Context, nodes: "Sequence[NodeSnapshot]") -> "Columns":
        """The pool's columns for this request's model: copies (a decision read later, when it is explained, must
        see what it was made from, not a table that changed since)."""
        model = ctx.request.model
        if isinstance(nodes, SnapshotTable):
            return cls(nodes.snapshots(), np.array(nodes.rows()), np.array(nodes.model_rows(model)))
        nodes = list(nodes)
        n = len(nodes)
        rows = np.frombuffer(b"".join([node.row for node in nodes]), dtype=np.float64).reshape(n, N_COLUMNS)
        mrows = np.frombuffer(b"".join([node.static.model_row(model) for node in nodes]), dtype=np.float64)
        return cls(nodes, rows, mrows.reshape(n, N_MODEL_COLUMNS))

    def __len__(self) -> int:
        return len(self.rows)

    def col(self, index: int) -> Array:
        return self.rows[:, index]

    def mcol(self, index: int) -> Array:
        return self.model[:, index]

    def cached(self, key: str, make: Callable[[], T]) -> T:
        """A per-decision figure, computed by the first plugin that needs it."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]  # type: ignore[return-value]

    def predictable(self, ctx: Context) -> Mask:
        """Nodes for which a prediction exists (model in the catalogue, hardware known)."""
        if ctx.model is None:
            return np.zeros(len(self), dtype=bool)
        return np.asarray(self.col(C_HAS_HW) > 0)

    def prediction(self, ctx: Context, *, loaded: bool) -> tuple[Array, Array]:
        """(TTFT, ITL) per node by the roofline (perfmodel.roofline), under the node's load or at rest (NaN where
        there is no prediction)."""
        return self.cached(f"pred{loaded}", lambda: self._roofline(ctx, loaded)[:2])

    def queue(self, ctx: Context) -> Array:
        """Predicted seconds each node's new request waits for a batch slot (part of its predicted TTFT; NaN where
        there is no prediction): what calibration leaves out, as it judges the node on its own service time."""
        return self._roofline(ctx, True)[2]

    def _roofline(self, ctx: Context, loaded: bool) -> tuple[Array, Array, Array]:
        """(TTFT, ITL, queue) per node, computed once per decision for both `prediction` and `queue`."""
        return self.cached(f"roofline{loaded}", lambda: _predict(self, ctx, loaded))

    def set_prediction(self, ttft: Array, itl: Array, queue: Array, alone: Array, prefill: Array) -> None:
        """Predictions under load and at rest computed elsewhere (the fused kernel, by the same formulas): what a
        candidate reads is not computed again."""
        self._cache["predTrue"] = (ttft, itl)
        self._cache["rooflineTrue"] = (ttft, itl, queue)
        self._cache["unloaded"] = (alone, prefill)

    def unloaded(self, ctx: Context) -> tuple[Array, Array]:
        """(ITL, prefill seconds) per node at rest, throttled, uncalibrated (the model must be predictable)."""
        return self.cached("unloaded", lambda: _unloaded(self, ctx))

    def reused(self, ctx: Context) -> Array:
        """Prompt tokens each node probably holds in its prefix cache (`ScheduleRequest.cached_tokens`)."""
        return self.cached("reused", lambda: _reused(self, ctx))

    def price(self, ctx: Context) -> Array:
        """USD per Mtok (NaN = unknown), as Context.price computes it."""
        return self.cached("price", lambda: self.mcol(M_PRICE))


def _reused(c: Columns, ctx: Context) -> Array:
    hits = dict(ctx.request.cached_tokens)
    if not hits:
        return np.zeros(len(c))
    return np.array([hits.get(node.node_id, 0) for node in c.nodes], dtype=np.float64)


def _unloaded(c: Columns, ctx: Context) -> tuple[Array, Array]:
    """The load-independent part, shared by both predictions: throttled ITL and prefill (of the prompt tokens
    each node does not hold in its prefix cache)."""
    assert ctx.model is not None
    speed = roofline.throttle(c.col(C_CLOCK), c.col(C_TEMP))
    prompt = ctx.request.prompt_tokens
    work = roofline.prefill_work(ctx.model, prompt - c.reused(ctx) if ctx.request.cached_tokens else prompt)
    itl, prefill = roofline.unloaded(work, c.mcol(M_BASE_ITL), c.col(C_TFLOPS) * 1e12 * c.col(C_PREFILL_EFF), speed)
    return np.asarray(itl), np.asarray(prefill)


def _predict(c: Columns, ctx: Context, loaded: bool) -> tuple[Array, Array, Array]:
    n = len(c)
    ok = c.predictable(ctx)
    if not ok.any():
        return np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    assert ctx.model is not None  # predictable
    alone, prefill = c.unloaded(ctx)
    slots = np.maximum(1.0, c.col(C_SLOTS))
    active, queued = (c.col(C_ACTIVE), c.col(C_QUEUED)) if loaded else (0.0, 0.0)
    ttft, itl, queue = roofline.under_load(
        alone,
        prefill,
        slots,
        active,
        queued,
        c.col(C_CAL_TTFT),
        c.col(C_CAL_ITL),
        c.mcol(M_LOAD_S),
        c.col(C_CAL_OUT),
        c.col(C_INTERLEAVED),
        *roofline.moe_terms(ctx.model),
    )
    return np.where(ok, ttft, np.nan), np.where(ok, itl, np.nan), np.where(ok, queue, np.nan)
