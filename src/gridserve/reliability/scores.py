"""Time-decayed evidence and the Beta-posterior scores built from it. O(1) per event and per read.

Each signal keeps a decayed count of good and bad outcomes. An outcome observed at `at` weighs
0.5 ** ((now - at) / half_life_s) at time `now`. Rather than re-scanning a ledger, the counts are kept as running
sums valid at `updated_at`: a newer event first decays the sums to its own time, a late (older) event is added with
its weight at `updated_at`, and a read decays a copy to `now`. Reads before `updated_at` are taken at `updated_at`
(evidence never weighs more than 1).

What each event is evidence of (good / bad):

| event | availability | completion | latency | clean |
|---|---|---|---|---|
| heartbeat_kept | good | | | good |
| heartbeat_missed | bad | | | |
| job_completed | | good | good if within_slo, bad if not, nothing if None | good |
| job_failed / job_timed_out / job_stalled | | bad | | |
| protocol_error | | | | bad |
| incident (minor) | | | | bad |
| incident (severe) | nothing: it moves state, not scores | | | |
| canary_passed | | | | good |

A failed job is evidence about completion, not about protocol hygiene: were it counted as a clean message, a node
could lift its clean score by failing jobs, and a failure could raise the combined score.
"""

import math
from dataclasses import dataclass, field

from gridserve.reliability.config import ReliabilityConfig
from gridserve.reliability.events import JOB_FAILURES, EventKind, NodeEvent

_AVAIL_GOOD, _AVAIL_BAD, _DONE_GOOD, _DONE_BAD, _SLO_GOOD, _SLO_BAD, _CLEAN_GOOD, _CLEAN_BAD = range(8)

_EVIDENCE: dict[EventKind, tuple[int, ...]] = {
    EventKind.HEARTBEAT_KEPT: (_AVAIL_GOOD, _CLEAN_GOOD),
    EventKind.HEARTBEAT_MISSED: (_AVAIL_BAD,),
    EventKind.JOB_COMPLETED: (_DONE_GOOD, _CLEAN_GOOD),
    **{kind: (_DONE_BAD,) for kind in JOB_FAILURES},
    EventKind.PROTOCOL_ERROR: (_CLEAN_BAD,),
    EventKind.INCIDENT: (_CLEAN_BAD,),
    EventKind.CANARY_PASSED: (_CLEAN_GOOD,),
    EventKind.AUDIT_PASSED: (),  # vetting counts it; no score: which answers are audited is chance, and the job
    # itself is already a completed job (a score for being audited would favour the nodes audited most)
    EventKind.SIGNALS_MATCHED: (_CLEAN_BAD,),
}


def evidence(event: NodeEvent) -> tuple[int, ...]:
    """The count slots one event adds 1 to (before decay)."""
    if event.is_severe:
        return ()
    slots = _EVIDENCE[event.kind]
    if event.kind is EventKind.JOB_COMPLETED and event.within_slo is not None:
        slots = (*slots, _SLO_GOOD if event.within_slo else _SLO_BAD)
    return slots


def decay(elapsed_s: float, half_life_s: float) -> float:
    """Weight of evidence `elapsed_s` old: 0.5 ** (elapsed / half-life), 1 for evidence not yet aged."""
    return math.exp2(-max(0.0, elapsed_s) / half_life_s)


@dataclass(slots=True)
class DecayedCounts:
    """Decayed good/bad counts per signal, as running sums valid at `updated_at` (unix seconds)."""

    half_life_s: float
    updated_at: float
    counts: list[float] = field(default_factory=lambda: [0.0] * 8)

    def add(self, event: NodeEvent) -> None:
        slots = evidence(event)
        if not slots:
            return
        if event.at >= self.updated_at:
            factor = decay(event.at - self.updated_at, self.half_life_s)
            counts = self.counts  # in place: a new list per event would be one more object for the GC per heartbeat
            for i, count in enumerate(counts):
                counts[i] = count * factor
            self.updated_at = event.at
            weight = 1.0
        else:
            weight = decay(self.updated_at - event.at, self.half_life_s)
        for slot in slots:
            self.counts[slot] += weight

    def at(self, now: float) -> list[float]:
        """The counts decayed to `now` (a copy; nothing changes)."""
        factor = decay(now - self.updated_at, self.half_life_s)
        return [count * factor for count in self.counts]


@dataclass(frozen=True, kw_only=True, slots=True)
class Scores:
    availability: float
    completion: float
    latency: float
    clean: float
    score: float
    """Weighted mean of the four signals (weights from the config), in [0, 1]."""
    samples: float
    """Decayed number of job outcomes (completed + failed)."""


def posterior_mean(good: float, bad: float, config: ReliabilityConfig) -> float:
    """Mean of the Beta(good + prior_good, bad + prior_bad) posterior, in [0, 1]."""
    alpha = good + config.prior_good
    return min(1.0, max(0.0, alpha / (alpha + bad + config.prior_bad)))


def scores(counts: DecayedCounts, now: float, config: ReliabilityConfig) -> Scores:
    """Scores from the decayed counts at `now`: O(1)."""
    c = counts.at(now)
    availability = posterior_mean(c[_AVAIL_GOOD], c[_AVAIL_BAD], config)
    completion = posterior_mean(c[_DONE_GOOD], c[_DONE_BAD], config)
    latency = posterior_mean(c[_SLO_GOOD], c[_SLO_BAD], config)
    clean = posterior_mean(c[_CLEAN_GOOD], c[_CLEAN_BAD], config)
    weighted = (
        config.weight_availability * availability
        + config.weight_completion * completion
        + config.weight_latency * latency
        + config.weight_clean * clean
    )
    total = config.weight_availability + config.weight_completion + config.weight_latency + config.weight_clean
    return Scores(
        availability=availability,
        completion=completion,
        latency=latency,
        clean=clean,
        score=min(1.0, max(0.0, weighted / total)),
        samples=c[_DONE_GOOD] + c[_DONE_BAD],
    )


def prior_scores(config: ReliabilityConfig) -> Scores:
    """The scores of a node with no evidence at all."""
    return scores(DecayedCounts(half_life_s=config.half_life_s, updated_at=0.0), 0.0, config)
