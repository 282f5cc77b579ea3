"""What can happen to a node: the ledger's entries."""

import math
import time
from dataclasses import dataclass
from enum import StrEnum

from gridserve.reliability.errors import InvalidEvent


class Severity(StrEnum):
    """How bad an incident is. MINOR moves scores; SEVERE moves state (quarantine, then ban)."""

    MINOR = "minor"
    SEVERE = "severe"


class EventKind(StrEnum):
    HEARTBEAT_KEPT = "heartbeat_kept"
    HEARTBEAT_MISSED = "heartbeat_missed"
    JOB_COMPLETED = "job_completed"
    JOB_FAILED = "job_failed"
    JOB_TIMED_OUT = "job_timed_out"
    JOB_STALLED = "job_stalled"
    PROTOCOL_ERROR = "protocol_error"
    """Bad signature, replay, malformed message from this node."""
    INCIDENT = "incident"
    """Carries a Severity. SEVERE: model-integrity failure, identity spoofing, settlement mismatch."""
    CANARY_PASSED = "canary_passed"
    AUDIT_PASSED = "audit_passed"
    """A served answer re-executed by the verifier and found right."""
    SIGNALS_MATCHED = "signals_matched"
    """A new identity registered from where a quarantined one was (address, endpoint or engine fingerprint): it
    owes `ReliabilityConfig.whitewash_checks` more checks before it is established, and counts as a minor incident."""


CHECKS_PASSED = frozenset({EventKind.CANARY_PASSED, EventKind.AUDIT_PASSED})
"""The kinds that count toward vetting a new identity (`ReliabilityConfig.vetting_checks`)."""


JOB_FAILURES = frozenset({EventKind.JOB_FAILED, EventKind.JOB_TIMED_OUT, EventKind.JOB_STALLED})
"""The kinds that count as a failed job (completion score, consecutive-failure ejection)."""


@dataclass(frozen=True, kw_only=True)
class NodeEvent:
    """One observation about a node at unix time `at` (seconds). Raises `InvalidEvent` if self-contradictory:
    a non-finite time, a SEVERE severity on anything but an INCIDENT, `within_slo` on anything but JOB_COMPLETED."""

    node_id: str
    kind: EventKind
    at: float
    severity: Severity = Severity.MINOR
    within_slo: bool | None = None
    """For JOB_COMPLETED: whether the job met its latency SLO (None: not measured; the latency score ignores it)."""
    detail: str = ""
    """Human-readable reason or evidence; quoted in transition reasons."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.at):
            raise InvalidEvent(f"event time must be finite, got {self.at!r}")
        if self.severity is Severity.SEVERE and self.kind is not EventKind.INCIDENT:
            raise InvalidEvent(f"only an incident can be severe, not {self.kind.value}")
        if self.within_slo is not None and self.kind is not EventKind.JOB_COMPLETED:
            raise InvalidEvent(f"within_slo applies to job_completed only, not {self.kind.value}")

    @classmethod
    def severe(cls, node_id: str, detail: str, at: float | None = None) -> "NodeEvent":
        """A severe incident now (or at `at`): evidence of wrong work, which quarantines the node."""
        when = time.time() if at is None else at
        return cls(node_id=node_id, kind=EventKind.INCIDENT, at=when, severity=Severity.SEVERE, detail=detail)

    @property
    def is_severe(self) -> bool:
        return self.kind is EventKind.INCIDENT and self.severity is Severity.SEVERE

    def describe(self) -> str:
        """`kind` (with severity for incidents) and the detail, for transition reasons."""
        what = f"{self.severity.value} incident" if self.kind is EventKind.INCIDENT else self.kind.value
        return f"{what}: {self.detail}" if self.detail else what
