"""Reliability: the ledger of node events, the time-decayed scores built from it, and the state machine
(healthy, ejected with backoff, probation, quarantined, banned) driven by incident severity.

Pure: no I/O and no clock (time is passed in as `now`, unix seconds). The gateway and the simulator both drive a
`ReliabilityBook`: `record()` events as they happen, read `summary()` per scheduling decision (O(1) per node).
Severe incidents are not averaged: one quarantines, a second bans. Routine noise moves scores and decays.
"""

from gridserve.reliability.book import ReliabilityBook, ReliabilitySummary
from gridserve.reliability.config import DEFAULT_CONFIG, ReliabilityConfig
from gridserve.reliability.errors import CannotRelease, InvalidConfig, InvalidEvent, ReliabilityError, UnknownNode
from gridserve.reliability.events import JOB_FAILURES, EventKind, NodeEvent, Severity
from gridserve.reliability.state import BLOCKED, EXCLUDED, ReliabilityState, Transition

__all__ = [
    "BLOCKED",
    "DEFAULT_CONFIG",
    "EXCLUDED",
    "JOB_FAILURES",
    "CannotRelease",
    "EventKind",
    "InvalidConfig",
    "InvalidEvent",
    "NodeEvent",
    "ReliabilityBook",
    "ReliabilityConfig",
    "ReliabilityError",
    "ReliabilityState",
    "ReliabilitySummary",
    "Severity",
    "Transition",
    "UnknownNode",
]
