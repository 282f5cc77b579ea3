"""The reliability book's configuration: one flat, keyword-only dataclass, each field with unit and source."""

import math
from dataclasses import dataclass

from gridserve.reliability.errors import InvalidConfig


@dataclass(frozen=True, kw_only=True)
class ReliabilityConfig:
    """Tunables of scores, ejection and quarantine. Validated on construction (`InvalidConfig`)."""

    half_life_s: float = 3600.0
    """Seconds after which one piece of evidence weighs half as much. Project choice: one hour, so routine noise
    (a missed heartbeat, a latency spike) fades within a working session while a node failing all afternoon stays
    down-ranked."""
    prior_good: float = 3.0
    """Beta prior pseudo-count of good outcomes, per signal (events). With `prior_bad` a new node starts at
    3 / (3 + 1) = 0.75 on every signal: neither trusted blindly nor starved of work. Project choice."""
    prior_bad: float = 1.0
    """Beta prior pseudo-count of bad outcomes, per signal (events). See `prior_good`."""
    consecutive_failures_to_eject: int = 5
    """Job failures in a row (failed, timed out, stalled) that eject a node (jobs). Envoy outlier detection
    `consecutive_5xx` default."""
    base_ejection_s: float = 30.0
    """Length of the first ejection (seconds); the n-th lasts n times this. Envoy `base_ejection_time` default."""
    max_ejection_s: float = 300.0
    """Cap on one ejection's length (seconds). Envoy `max_ejection_time` default."""
    max_ejected_share: float = 0.10
    """Largest share of the pool (known, non-banned nodes) ejected at once (fraction 0..1). Envoy
    `max_ejection_percent` default 10%. As in Envoy one node may always be ejected when none is (0 disables
    ejection); unlike Envoy, which ejects while the share is still *below* the limit and so can overshoot by one,
    a further ejection happens only if the share *after* it stays within the limit."""
    probation_successes: int = 3
    """Completed jobs or passed canaries, in probation, that make a node healthy again (events). Project choice:
    a node that fails half its jobs passes three in a row by chance only 12.5% of the time."""
    canaries_to_release: int = 3
    """Passed canaries that end a quarantine without an admin (events). Project choice, as `probation_successes`."""
    exploration_samples: int = 20
    """Below this many decayed job outcomes a node counts as new (jobs). Project choice: with the default prior,
    ~20 outcomes bring the posterior standard deviation of a 0.75 success rate under 0.09."""
    vetting_checks: int = 3
    """Verification checks (audits or canaries) a new identity passes before it is established: until then it serves
    only the scheduler's exploration share of a model's requests wherever an established node is eligible (issue
    17: a Sybil's fresh keys earn traffic only by passing checks). Project choice: at the default new-node audit
    rate, three checks take a few dozen requests; a node that alters half its answers passes three by chance 12.5%
    of the time. 0: every identity is established at once (no vetting)."""
    whitewash_checks: int = 6
    """Checks owed on top of `vetting_checks` by a new identity that registers from where a quarantined one was
    (its address, endpoint or engine fingerprint: gateway/registry/whitewash.py). Project choice: three times the
    vetting, so a fresh key from the same place starts further back, not from zero."""
    weight_availability: float = 0.20
    """Weight of availability (heartbeats kept) in the combined score. Project choice: heartbeats only predict."""
    weight_completion: float = 0.40
    """Weight of completion (jobs finished) in the combined score. Project choice: a failed job costs a retry."""
    weight_latency: float = 0.25
    """Weight of latency (completed jobs within SLO) in the combined score. Project choice."""
    weight_clean: float = 0.15
    """Weight of clean operation (messages without protocol errors) in the combined score. Project choice: the
    trust layer already rejects the bad messages themselves."""
    ledger_events_per_node: int = 1000
    """Routine events kept per node for `events()` (events); older ones are evicted. Incidents are kept apart
    and never evicted. Project choice: a few hours of heartbeats at one per 10-30 s."""

    def __post_init__(self) -> None:
        positive = {"half_life_s": self.half_life_s, "base_ejection_s": self.base_ejection_s}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise InvalidConfig(name, f"must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.max_ejection_s) and self.max_ejection_s >= self.base_ejection_s):
            raise InvalidConfig("max_ejection_s", f"must be finite and >= base_ejection_s, got {self.max_ejection_s!r}")
        self._check_non_negative({"prior_good": self.prior_good, "prior_bad": self.prior_bad})
        if self.prior_good + self.prior_bad <= 0:
            raise InvalidConfig("prior_good", "prior_good + prior_bad must be > 0")
        self._check_non_negative(self.weights)
        if sum(self.weights.values()) <= 0:
            raise InvalidConfig("weight_completion", "the signal weights must not all be 0")
        if not (0.0 <= self.max_ejected_share <= 1.0):
            raise InvalidConfig("max_ejected_share", f"must be within [0, 1], got {self.max_ejected_share!r}")
        counts = {
            "consecutive_failures_to_eject": self.consecutive_failures_to_eject,
            "probation_successes": self.probation_successes,
            "canaries_to_release": self.canaries_to_release,
            "ledger_events_per_node": self.ledger_events_per_node,
        }
        for name, count in counts.items():
            if count < 1:
                raise InvalidConfig(name, f"must be >= 1, got {count!r}")
        for name, count in {
            "exploration_samples": self.exploration_samples,
            "vetting_checks": self.vetting_checks,
            "whitewash_checks": self.whitewash_checks,
        }.items():
            if count < 0:
                raise InvalidConfig(name, f"must be >= 0, got {count!r}")

    @staticmethod
    def _check_non_negative(values: dict[str, float]) -> None:
        for name, value in values.items():
            if not (math.isfinite(value) and value >= 0):
                raise InvalidConfig(name, f"must be a finite number >= 0, got {value!r}")

    @property
    def weights(self) -> dict[str, float]:
        """The four signal weights by signal name (the `weight_*` fields, keyed without the prefix)."""
        return {
            "availability": self.weight_availability,
            "completion": self.weight_completion,
            "latency": self.weight_latency,
            "clean": self.weight_clean,
        }

    def ejection_s(self, ejections: int) -> float:
        """Length of the `ejections`-th ejection (1-based), in seconds: base × n, capped."""
        return min(self.base_ejection_s * max(1, ejections), self.max_ejection_s)

    def ejection_limit(self, pool: int) -> int:
        """How many of `pool` nodes may be ejected at once: the share, rounded down, but at least one."""
        if self.max_ejected_share <= 0:
            return 0
        return max(1, math.floor(self.max_ejected_share * pool + 1e-9))


DEFAULT_CONFIG = ReliabilityConfig()
