"""Pickers: choose among the ranked eligible nodes."""

import random
from collections.abc import Sequence
from dataclasses import dataclass

from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import PICKERS, Scored, register
from gridserve.scheduler.snapshot import NodeSnapshot


@register(PICKERS, "max-score")
@dataclass
class MaxScorePicker:
    """The best score wins (ties are broken at random upstream). With probability `exploration`, the best
    *new* node (little record) with a free batch slot that is predicted to meet the request's SLO is picked
    instead, so newcomers earn a record: bounded exploration. The free slot bounds it: a newcomer whose first
    jobs have not finished yet is not sent more (otherwise one slow newcomer would take the whole exploration
    share of the traffic and build a queue). The SLO bounds it too: a request is never the price of a
    newcomer's record (a cold node that would first load the model, or a slow one, is not explored)."""

    exploration: float = 0.05
    slo_first: bool = False
    """Pick the best node that has a batch slot free and is predicted to meet the request's TTFT and TPOT
    targets; else the best predicted to meet them (it will queue); else the best overall (scores rank; the SLO
    decides between a node that makes it and one that does not, and a queue's wait is the least certain part
    of a prediction)."""
    slo_headroom: float = 1.0
    """A node meets the SLO when its predictions are within this share of the targets (predictions are means;
    the SLO is met or missed in the tail)."""
    name: str = "max-score"

    def pick(self, ctx: Context, ranked: Sequence[Scored], rng: random.Random) -> tuple[int, str]:
        if self.exploration > 0 and len(ranked) > 1 and rng.random() < self.exploration:
            first = getattr(ranked, "first_explorable", None)  # the vectorised ranking finds it over columns
            found = (
                first(ctx, self.slo_headroom, 1)
                if first is not None
                else _first_explorable(ctx, ranked, self.slo_headroom)
            )
            if found is not None:
                return found, f"exploration (p={self.exploration}): newest node with a short record"
        if self.slo_first:
            first = getattr(ranked, "first_meeting_slo", None)  # the vectorised ranking finds it over columns
            for at_once in (True, False):
                found = (
                    first(ctx, self.slo_headroom, at_once)
                    if first is not None
                    else _first_meeting_slo(ctx, ranked, self.slo_headroom, at_once)
                )
                if found is not None:
                    how = "can start it at once and " if at_once else ""
                    return found, f"highest score among nodes that {how}are predicted to meet the SLO"
            return 0, "highest score (no node is predicted to meet the SLO)"
        return 0, "highest score"


def free_slot(node: NodeSnapshot) -> bool:
    """Fewer requests in flight or queued than the card has batch slots."""
    tele = node.telemetry
    busy = max(node.outstanding, tele.active_requests if tele else 0) + (tele.queue_depth if tele else 0)
    slots = node.static.hw.batch_slots if node.static.hw else 1
    return busy < max(1, slots)


def explorable(ctx: Context, node: NodeSnapshot, headroom: float = 1.0) -> bool:
    """Little or no record, a batch slot free, and predicted to meet the request's SLO."""
    rel = node.reliability
    return (rel is None or rel.is_new) and free_slot(node) and meets_slo(ctx, node, headroom)


def meets_slo(ctx: Context, node: NodeSnapshot, headroom: float = 1.0) -> bool:
    pred = ctx.prediction(node)
    return pred is not None and pred.ttft_s <= ctx.ttft_slo_s * headroom and pred.itl_s <= ctx.tpot_slo_s * headroom


def _first_meeting_slo(ctx: Context, ranked: Sequence[Scored], headroom: float, at_once: bool) -> int | None:
    return next(
        (
            i
            for i, scored in enumerate(ranked)
            if meets_slo(ctx, scored.node, headroom) and (not at_once or free_slot(scored.node))
        ),
        None,
    )


def _first_explorable(ctx: Context, ranked: Sequence[Scored], headroom: float) -> int | None:
    return next((i for i, scored in enumerate(ranked) if i > 0 and explorable(ctx, scored.node, headroom)), None)


@register(PICKERS, "random")
@dataclass
class RandomPicker:
    name: str = "random"

    def pick(self, ctx: Context, ranked: Sequence[Scored], rng: random.Random) -> tuple[int, str]:
        return rng.randrange(len(ranked)), "uniformly at random among eligible nodes"
