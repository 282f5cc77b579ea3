"""Pickers: choose among the ranked eligible nodes (what they ask of them is answered over columns: ranking.py)."""

import random
from dataclasses import dataclass

from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import PICKERS, register
from gridserve.scheduler.ranking import Ranked


@register(PICKERS, "max-score")
@dataclass
class MaxScorePicker:
    """The best score wins (ties are broken at random upstream). With probability `exploration`, the best
    *new* node (little record) with a free batch slot that is predicted to meet the request's SLO is picked
    instead, so newcomers earn a record: bounded exploration. The free slot bounds it: a newcomer whose first
    jobs have not finished yet is not sent more (otherwise one slow newcomer would take the whole exploration
    share of the traffic and build a queue). The SLO bounds it too: a request is never the price of a
    newcomer's record (a cold node that would first load the model, or a slow one, is not explored); nor is a
    prefix-cache hit (a request some eligible node probably holds part of is not explored).

    Newcomers are held back: an identity that has not passed its vetting checks (`ReliabilityConfig.vetting_checks`
    audits or canaries) is picked only by exploration wherever an established node is eligible, so all of a
    model's newcomers together get at most `exploration` of its requests however many keys a Sybil makes (issue
    17); where no established node is eligible, newcomers are ranked like any node."""

    exploration: float = 0.05
    slo_first: bool = False
    """Pick the best node that has a batch slot free (or holds part of the prompt in its prefix cache) and is
    predicted to meet the request's TTFT and TPOT targets; else the best predicted to meet them (it will queue);
    else the best overall (scores rank; the SLO decides between a node that makes it and one that does not, and
    a queue's wait is the least certain part of a prediction, except where a cached prefix makes the wait
    worth it: the prefill skipped there is grid work saved)."""
    slo_headroom: float = 1.0
    """A node meets the SLO when its predictions are within this share of the targets (predictions are means;
    the SLO is met or missed in the tail)."""
    prefix_margin: float = 0.0
    """With slo_first: a node that holds more of the prompt in its prefix cache than the pick, is predicted to
    answer sooner and meets the SLO (or none does) wins if its score is within this much of the pick's (the
    prefill it skips is grid work saved; load and reliability still decide beyond the margin)."""
    name: str = "max-score"

    def pick(self, ctx: Context, ranked: Ranked, rng: random.Random) -> tuple[int, str]:
        if (
            self.exploration > 0
            and len(ranked) > 1
            and rng.random() < self.exploration
            and not ranked.holds_prefix(ctx)
        ):
            found = ranked.first_explorable(ctx, self.slo_headroom, 1)
            if found is not None:
                return found, f"exploration (p={self.exploration}): the best node with a short record or not yet vetted"
        if self.slo_first:
            for at_once in (True, False):
                found = ranked.first_meeting_slo(ctx, self.slo_headroom, at_once)
                if found is not None:
                    how = "can start it at once and " if at_once else ""
                    return self._prefer_hit(ctx, ranked, found, True) or (
                        found,
                        f"highest score among nodes that {how}are predicted to meet the SLO" + _held(ranked),
                    )
            best = ranked.first_allowed()
            return self._prefer_hit(ctx, ranked, best, False) or (
                best,
                "highest score (no node is predicted to meet the SLO)" + _held(ranked),
            )
        return ranked.first_allowed(), "highest score" + _held(ranked)

    def _prefer_hit(self, ctx: Context, ranked: Ranked, found: int, slo: bool) -> tuple[int, str] | None:
        """The node that holds more of the prompt than the pick at rank `found`, answers sooner (and meets the SLO
        if `slo`) and scores within `prefix_margin` of it; None: keep the pick."""
        if self.prefix_margin <= 0 or not ctx.request.cached_tokens:
            return None
        hit = ranked.better_hit(ctx, self.slo_headroom if slo else None, found, self.prefix_margin)
        if hit is None:
            return None
        meeting = "the best node that meets the SLO" if slo else "the best node (none is predicted to meet the SLO)"
        return (
            hit,
            f"holds more of the prompt, is predicted to answer sooner and scores within {self.prefix_margin} "
            f"of {meeting}",
        )


def _held(ranked: Ranked) -> str:
    if not ranked.held_back:
        return ""
    return f" ({ranked.held_back} unvetted newcomer(s) held back to the exploration share)"


@register(PICKERS, "random")
@dataclass
class RandomPicker:
    name: str = "random"

    def pick(self, ctx: Context, ranked: Ranked, rng: random.Random) -> tuple[int, str]:
        return rng.randrange(len(ranked)), "uniformly at random among eligible nodes"
