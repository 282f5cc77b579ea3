"""The state machine: healthy, ejected with backoff, probation, quarantined, banned.

    HEALTHY ──N job failures in a row──▶ EJECTED ──ejected_until passes──▶ PROBATION ──K successes──▶ HEALTHY
                                            ▲                                 │
                                            └──────── any job failure ────────┘
    any but BANNED ──severe incident or admin quarantine──▶ QUARANTINED
    QUARANTINED ──admin release, or M passed canaries──▶ PROBATION
    any ──second severe incident (ever)──▶ BANNED  (permanent)

N = consecutive_failures_to_eject, K = probation_successes, M = canaries_to_release. An ejection happens only
if the pool's ejection limit allows it (the book decides; `may_eject`). Minor incidents and routine failures
never quarantine: they only move scores and the consecutive-failure count. While EJECTED, job outcomes (of jobs
already in flight) change no state; while QUARANTINED only canaries and severe incidents do.
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gridserve.reliability.config import ReliabilityConfig
from gridserve.reliability.errors import CannotRelease
from gridserve.reliability.events import CHECKS_PASSED, JOB_FAILURES, EventKind, NodeEvent


class ReliabilityState(StrEnum):
    """A node's standing. The values are a subset of `gridserve.types.NodeState`'s (same strings)."""

    HEALTHY = "healthy"
    EJECTED = "ejected"
    PROBATION = "probation"
    QUARANTINED = "quarantined"
    BANNED = "banned"


EXCLUDED = frozenset({ReliabilityState.QUARANTINED, ReliabilityState.BANNED})
"""States whose combined score is 0: the node must not be chosen, whatever its record."""
BLOCKED = frozenset({ReliabilityState.EJECTED, *EXCLUDED})
"""States in which a node serves nothing (the scheduler's node-state filter and every chain of stages)."""


@dataclass(frozen=True, kw_only=True)
class Transition:
    """One state change, at unix time `at`, with the evidence that caused it."""

    node_id: str
    at: float
    old: ReliabilityState
    new: ReliabilityState
    reason: str


@dataclass(slots=True)
class NodeStatus:
    """A node's place in the state machine and the counters that move it (mutable; owned by the book)."""

    node_id: str
    state: ReliabilityState = ReliabilityState.HEALTHY
    reason: str = ""
    ejected_until: float | None = None
    ejections: int = 0
    failure_run: int = 0
    probation_successes: int = 0
    canaries_passed: int = 0
    severe_incidents: int = 0
    first_severe: str = ""
    checks_passed: int = 0
    """Audits and canaries passed since the identity appeared or its last severe incident (never reset by a
    state change otherwise): what vets a new identity."""
    checks_owed: int = 0
    """Checks owed beyond `vetting_checks` before the identity is established: a fresh key that shares an
    address, endpoint or engine fingerprint with a quarantined identity starts further back (SIGNALS_MATCHED)."""

    def vetted(self, config: ReliabilityConfig) -> bool:
        """Whether the identity is established: it has passed its vetting checks (and any it owes)."""
        return self.checks_passed >= config.vetting_checks + self.checks_owed

    def move(self, new: ReliabilityState, at: float, reason: str) -> Transition:
        """Enter `new`, resetting the per-state counters, and say so."""
        transition = Transition(node_id=self.node_id, at=at, old=self.state, new=new, reason=reason)
        self.state = new
        self.reason = "" if new is ReliabilityState.HEALTHY else reason
        self.failure_run = 0
        self.probation_successes = 0
        self.canaries_passed = 0
        if new is not ReliabilityState.EJECTED:
            self.ejected_until = None
        return transition


def expire(status: NodeStatus, now: float, config: ReliabilityConfig) -> list[Transition]:
    """An ejection whose time has passed becomes PROBATION (at the moment it ended, not at `now`)."""
    if status.state is not ReliabilityState.EJECTED or status.ejected_until is None or now < status.ejected_until:
        return []
    reason = (
        f"ejection #{status.ejections} ended; on probation until {config.probation_successes} successes"
        f" (was: {status.reason})"
    )
    return [status.move(ReliabilityState.PROBATION, status.ejected_until, reason)]


def on_event(
    status: NodeStatus, event: NodeEvent, config: ReliabilityConfig, may_eject: Callable[[], bool]
) -> list[Transition]:
    """Apply one event (after `expire`). `may_eject` says whether the pool allows one more ejection now."""
    if event.is_severe:
        status.checks_passed = 0  # vetting starts over: an identity caught once must pass its checks again
        return _severe(status, event)
    if event.kind in CHECKS_PASSED:
        status.checks_passed += 1
    elif event.kind is EventKind.SIGNALS_MATCHED:
        status.checks_owed = max(status.checks_owed, config.whitewash_checks)
    if status.state is ReliabilityState.QUARANTINED:
        return _canary(status, event, config) if event.kind is EventKind.CANARY_PASSED else []
    if status.state in (ReliabilityState.BANNED, ReliabilityState.EJECTED):
        return []
    if event.kind in JOB_FAILURES:
        return _failure(status, event, config, may_eject)
    if event.kind is EventKind.JOB_COMPLETED:
        status.failure_run = 0
    if status.state is ReliabilityState.PROBATION and (
        event.kind is EventKind.JOB_COMPLETED or event.kind in CHECKS_PASSED
    ):
        status.probation_successes += 1
        if status.probation_successes >= config.probation_successes:
            reason = f"{status.probation_successes} successes in probation (last: {event.describe()})"
            return [status.move(ReliabilityState.HEALTHY, event.at, reason)]
    return []


def _failure(
    status: NodeStatus, event: NodeEvent, config: ReliabilityConfig, may_eject: Callable[[], bool]
) -> list[Transition]:
    status.failure_run += 1
    in_probation = status.state is ReliabilityState.PROBATION
    if not in_probation and status.failure_run < config.consecutive_failures_to_eject:
        return []
    if not may_eject():
        # The pool is at its ejection limit: stay, keep counting; the next failure tries again.
        status.probation_successes = 0
        return []
    evidence = (
        f"job failure in probation ({event.describe()})"
        if in_probation
        else f"{status.failure_run} consecutive job failures (last: {event.describe()})"
    )
    status.ejections += 1
    duration = config.ejection_s(status.ejections)
    transition = status.move(
        ReliabilityState.EJECTED, event.at, f"{evidence}; ejection #{status.ejections} for {duration:g}s"
    )
    status.ejected_until = event.at + duration
    return [transition]


def _severe(status: NodeStatus, event: NodeEvent) -> list[Transition]:
    status.severe_incidents += 1
    if status.state is ReliabilityState.BANNED:
        return []
    if status.severe_incidents == 1:
        status.first_severe = event.describe()
        return [status.move(ReliabilityState.QUARANTINED, event.at, event.describe())]
    reason = f"severe incident #{status.severe_incidents} (ban): {event.describe()}; first was {status.first_severe}"
    return [status.move(ReliabilityState.BANNED, event.at, reason)]


def _canary(status: NodeStatus, event: NodeEvent, config: ReliabilityConfig) -> list[Transition]:
    status.canaries_passed += 1
    if status.canaries_passed < config.canaries_to_release:
        return []
    reason = f"passed {status.canaries_passed} canaries in quarantine (last: {event.describe()})"
    return [status.move(ReliabilityState.PROBATION, event.at, reason)]


def admin_quarantine(status: NodeStatus, reason: str, now: float) -> list[Transition]:
    """Quarantine from any state but BANNED (already stricter) and QUARANTINED (already there): then no-op."""
    if status.state in EXCLUDED:
        return []
    return [status.move(ReliabilityState.QUARANTINED, now, f"quarantined by admin: {reason}")]


def admin_release(status: NodeStatus, reason: str, now: float) -> list[Transition]:
    """End a quarantine or an ejection early, into PROBATION. No-op when HEALTHY or already in PROBATION.

    Raises `CannotRelease` for a BANNED node: a ban is permanent.
    """
    if status.state is ReliabilityState.BANNED:
        raise CannotRelease(status.node_id, status.reason)
    if status.state in (ReliabilityState.HEALTHY, ReliabilityState.PROBATION):
        return []
    return [status.move(ReliabilityState.PROBATION, now, f"released by admin: {reason}")]
