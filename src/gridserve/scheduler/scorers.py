"""Scorers: each maps one signal to [0, 1] (higher is better) and keeps the raw figure it came from, for every
node at once (the decision's columns).

All are absolute (a node's score does not depend on the other nodes), so improving a node on every signal
can never lower its rank.
"""

from dataclasses import dataclass

import numpy as np

from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import SCORERS, register
from gridserve.scheduler.snapshot import (
    C_ACTIVE,
    C_HAS_HW,
    C_QUEUED,
    C_REL_PROBATION,
    C_REL_SCORE,
    C_SLOTS,
    M_RESIDENT,
    NodeSnapshot,
)
from gridserve.scheduler.vector import Array, Columns
from gridserve.types import NodeState

PRIOR_RELIABILITY = 0.75
"""A node with no record scores as the reliability ledger's prior mean (3 good : 1 bad pseudo-counts)."""


def inverse(ratio: Array) -> Array:
    """1 at ratio 0, 0.5 at ratio 1 (exactly on target), towards 0 as the ratio grows; NaN stays NaN (callers
    mask it), without a floating-point warning to silence."""
    return np.asarray(1.0 / (1.0 + np.maximum(ratio, 0.0)))  # np.maximum keeps NaN


@register(SCORERS, "latency")
@dataclass
class LatencyScorer:
    """Predicted TTFT and ITL against the request's SLO (tier targets unless the request sets its own)."""

    name: str = "latency"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "no prediction (unknown model or hardware)" if raw == -1.0 else "s predicted end to end"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        ttft, itl = cols.prediction(ctx, loaded=True)
        missing = np.isnan(ttft)
        norm = 0.5 * inverse(ttft / ctx.ttft_slo_s) + 0.5 * inverse(itl / ctx.tpot_slo_s)
        raw = ttft + itl * max(0, ctx.request.max_tokens - 1)
        return np.where(missing, 0.5, norm), np.where(missing, -1.0, raw)


@register(SCORERS, "reliability")
@dataclass
class ReliabilityScorer:
    """The ledger's time-decayed score (availability, completion, latency, clean operation); probation halves it."""

    probation_factor: float = 0.5
    name: str = "reliability"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        rel = node.reliability
        record = "no record: prior" if rel is None else f"{rel.state.value}, {rel.samples:.0f} jobs"
        if node.state == NodeState.PROBATION:
            record += "; membership probation"
        return f"score ({record})"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        score = cols.col(C_REL_SCORE)
        base = np.where(np.isnan(score), PRIOR_RELIABILITY, score)
        value = base * np.where(cols.col(C_REL_PROBATION) > 0, self.probation_factor, 1.0)
        return np.clip(value, 0.0, 1.0), base


@register(SCORERS, "load")
@dataclass
class LoadScorer:
    """Requests in flight relative to the hardware's batch slots."""

    name: str = "load"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "requests in flight or queued"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        load = cols.col(C_ACTIVE) + cols.col(C_QUEUED)
        slots = np.where(cols.col(C_HAS_HW) > 0, cols.col(C_SLOTS), 1.0)
        return inverse(load / np.maximum(1.0, slots)), load


@register(SCORERS, "price")
@dataclass
class PriceScorer:
    """Cheaper is better: 0.5 at the tier's reference price."""

    name: str = "price"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "$/Mtok (unknown)" if raw == -1.0 else "$/Mtok"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        price = cols.price(ctx)
        missing = np.isnan(price)
        norm = inverse(price / ctx.tier.reference_price_per_mtok)
        return np.where(missing, 0.5, norm), np.where(missing, -1.0, price)


@register(SCORERS, "warm")
@dataclass
class WarmScorer:
    """A node with the model already resident beats one that must load it first."""

    cold: float = 0.2
    name: str = "warm"

    def unit_for(self, node: NodeSnapshot, raw: float) -> str:
        return "model resident"

    def score(self, ctx: Context, cols: Columns) -> tuple[Array, Array]:
        resident = cols.mcol(M_RESIDENT) > 0
        return np.where(resident, 1.0, self.cold), np.where(resident, 1.0, 0.0)
