"""The events the node registry applies: everything that changes what the gateway knows of a node arrives as one
of these, whatever its source (a node's own message, another gateway's row in the shared database, the ledger
replayed at start, a dispatch, an admin). `NodeRegistry.apply(event)` is the one place they take effect.

Each carries the time it was observed (`at`, unix seconds) where the rules depend on time, so applying the same
events in the same order gives the same state.
"""

from dataclasses import dataclass
from typing import Literal

from gridserve.reliability import NodeEvent
from gridserve.types import Capability, NodeId, NodeState, Telemetry


@dataclass(frozen=True, slots=True)
class Registered:
    """A node registered: with this gateway (`via` None), or with another on the same database (`via` names it;
    its signed registration was checked there), which this gateway adopts."""

    capability: Capability
    at: float
    """When this gateway learned of it."""
    registered_at: float
    capability_at: float
    last_seen: float
    via: str | None = None


@dataclass(frozen=True, slots=True)
class HeartbeatSeen:
    """A verified heartbeat taken here."""

    node_id: NodeId
    at: float
    seq: int
    telemetry: Telemetry


@dataclass(frozen=True, slots=True)
class HeardElsewhere:
    """Another gateway took a heartbeat from the node (its row in the shared database moved)."""

    node_id: NodeId
    at: float
    last_seen: float
    telemetry: Telemetry | None


@dataclass(frozen=True, slots=True)
class ProbeAnswered:
    """An active /health probe answered (`ok`) or not."""

    node_id: NodeId
    at: float
    ok: bool
    rtt_s: float
    error: str = ""


@dataclass(frozen=True, slots=True)
class RequestStarted:
    node_id: NodeId


@dataclass(frozen=True, slots=True)
class RequestEnded:
    node_id: NodeId


@dataclass(frozen=True, slots=True)
class JobObserved:
    """A completed request's timings (`fresh_ttft_s`: the TTFT of a segment that did not resume another node's
    work, else None)."""

    node_id: NodeId
    ttft_s: float
    raw_predicted_ttft_s: float | None
    fresh_ttft_s: float | None
    raw_predicted_itl_s: float
    itl_s: float | None
    service: tuple[float, float] | None = None
    """(uncalibrated predicted, observed) TTFT without the wait for a batch slot, where the node reports that wait:
    the calibration's pair then (the queue prediction's error is not the node's speed)."""
    completion_tokens: int | None = None
    """The answer's length: the node's typical length prices the queue behind it (`Calibration.output_tokens`)."""
    at: float = 0.0
    """When it was observed (unix seconds): the time of an incident its claim check records."""


@dataclass(frozen=True, slots=True)
class Noted:
    """A reliability ledger event: a job outcome, an incident, a canary, a heartbeat kept or missed.
    `stored`: read from the store (the ledger replayed at start, another gateway's event): not written again."""

    event: NodeEvent
    stored: bool = False


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The gateway judged the node's membership state (a dispatch could not reach it). `if_live`: only if it is
    in a live state now."""

    node_id: NodeId
    at: float
    state: NodeState
    reason: str
    if_live: bool = True


@dataclass(frozen=True, slots=True)
class AdminAction:
    """An admin quarantined or released the node (here, or on another gateway, or before a restart: `stored`).
    A release of a banned node raises `CannotRelease` unless `stored` (a ban later in the ledger wins)."""

    node_id: NodeId
    at: float
    action: Literal["quarantine", "release"]
    reason: str
    stored: bool = False


@dataclass(frozen=True, slots=True)
class Swept:
    """The failure detector's pass at `at`: heartbeats age (suspect, then down), ended ejections take effect."""

    at: float


Event = (
    Registered
    | HeartbeatSeen
    | HeardElsewhere
    | ProbeAnswered
    | RequestStarted
    | RequestEnded
    | JobObserved
    | Noted
    | StateChanged
    | AdminAction
    | Swept
)
