"""Scorers: each maps one signal to [0, 1] (higher is better) and keeps the raw figure it came from.

All are absolute (a node's score does not depend on the other nodes), so improving a node on every signal
can never lower its rank.
"""

from dataclasses import dataclass

from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import SCORERS, Score, register
from gridserve.scheduler.snapshot import NodeSnapshot

PRIOR_RELIABILITY = 0.75
"""A node with no record scores as the reliability ledger's prior mean (3 good : 1 bad pseudo-counts)."""


def _inverse(ratio: float) -> float:
    """1 at ratio 0, 0.5 at ratio 1 (exactly on target), towards 0 as the ratio grows."""
    return 1.0 / (1.0 + max(0.0, ratio))


@register(SCORERS, "latency")
@dataclass
class LatencyScorer:
    """Predicted TTFT and ITL against the request's SLO (tier targets unless the request sets its own)."""

    name: str = "latency"

    def score(self, ctx: Context, node: NodeSnapshot) -> Score:
        pred = ctx.prediction(node)
        if pred is None:
            return Score(0.5, -1.0, "no prediction (unknown model or hardware)")
        normalized = 0.5 * _inverse(pred.ttft_s / ctx.ttft_slo_s) + 0.5 * _inverse(pred.itl_s / ctx.tpot_slo_s)
        return Score(normalized, pred.e2e_s(ctx.request.max_tokens), "s predicted end to end")


@register(SCORERS, "reliability")
@dataclass
class ReliabilityScorer:
    """The ledger's time-decayed score (availability, completion, latency, clean operation); probation halves it."""

    probation_factor: float = 0.5
    name: str = "reliability"

    def score(self, ctx: Context, node: NodeSnapshot) -> Score:
        rel = node.reliability
        if rel is None:
            return Score(PRIOR_RELIABILITY, PRIOR_RELIABILITY, "score (no record: prior)")
        value = rel.score * (self.probation_factor if rel.state.value == "probation" else 1.0)
        return Score(max(0.0, min(1.0, value)), rel.score, f"score ({rel.state.value}, {rel.samples:.0f} jobs)")


@register(SCORERS, "load")
@dataclass
class LoadScorer:
    """Requests in flight relative to the hardware's batch slots."""

    name: str = "load"

    def score(self, ctx: Context, node: NodeSnapshot) -> Score:
        tele = node.telemetry
        load = max(node.outstanding, tele.active_requests if tele else 0) + (tele.queue_depth if tele else 0)
        slots = node.static.hw.batch_slots if node.static.hw else 1
        return Score(_inverse(load / max(1, slots)), float(load), "requests in flight or queued")


@register(SCORERS, "price")
@dataclass
class PriceScorer:
    """Cheaper is better: 0.5 at the tier's reference price."""

    name: str = "price"

    def score(self, ctx: Context, node: NodeSnapshot) -> Score:
        price = ctx.price(node)
        if price is None:
            return Score(0.5, -1.0, "$/Mtok (unknown)")
        return Score(_inverse(price / ctx.tier.reference_price_per_mtok), price, "$/Mtok")


@register(SCORERS, "warm")
@dataclass
class WarmScorer:
    """A node with the model already resident beats one that must load it first."""

    cold: float = 0.2
    name: str = "warm"

    def score(self, ctx: Context, node: NodeSnapshot) -> Score:
        resident = ctx.resident(node)
        return Score(1.0 if resident else self.cold, 1.0 if resident else 0.0, "model resident")
