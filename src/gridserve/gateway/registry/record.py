"""What the gateway knows of one node (`NodeRecord`), read-only outside the registry, and the one predicate that
says whether a node can serve.

A record is a frozen dataclass: `record.state = ...` anywhere raises (and mypy refuses it); the registry
(registry.py) is the one writer, through `assign`. Its fields hold what a heartbeat changes as plain values
(floats, ints, strings, bytes, flat tuples of them): a heartbeat allocates nothing that outlives it and that the
cyclic garbage collector would have to walk, so a full collection's pause does not grow with the grid. Telemetry
is kept as `TelemetryRow`, a tuple of atoms, and rebuilt as a `Telemetry` when read.
"""

from dataclasses import dataclass, field
from typing import Any, get_origin

import orjson
from pydantic import BaseModel

from gridserve.perfmodel import Calibration
from gridserve.reliability import BLOCKED, ReliabilityBook, ReliabilityState
from gridserve.scheduler import NodeSnapshot, NodeStatic
from gridserve.scheduler.snapshot import SERVING
from gridserve.types import Capability, NodeState, Telemetry
from gridserve.types.node import NodeError

LIVE = SERVING
"""Membership states in which a node receives work (probation: ranked lower); the scheduler's own set."""

TELEMETRY_FIELDS = tuple(Telemetry.model_fields)
_LISTS = {
    name: i for i, name in enumerate(TELEMETRY_FIELDS) if get_origin(Telemetry.model_fields[name].annotation) is tuple
}
"""The fields that are tuples (clock reasons, errors, faults): kept as JSON bytes (None when empty), so the row has
no tuple inside it (a tuple of tuples takes the collector one more pass to stop tracking)."""
_ITEMS: dict[str, type[BaseModel]] = {"errors": NodeError}
TelemetryRow = tuple[Any, ...]
"""A Telemetry's field values in TELEMETRY_FIELDS order: numbers and None, the tuple fields as JSON bytes."""
T_ACTIVE, T_QUEUED, T_CLOCK, T_TEMP = (
    TELEMETRY_FIELDS.index(name) for name in ("active_requests", "queue_depth", "clock_ratio", "temperature_c")
)
"""Where a TelemetryRow holds the fields read on hot paths (the scheduler's row, the fair queue's recount)."""
NO_CALIBRATION = Calibration()
"""Shared by every record with no observation yet (immutable)."""
TTFT_RATIOS_KEPT = 256


def pack_telemetry(telemetry: Telemetry) -> TelemetryRow:
    """The telemetry as a tuple of atoms: the collector stops tracking it the first time it examines it, so it never
    reaches the generations a full collection walks."""
    values = [getattr(telemetry, name) for name in TELEMETRY_FIELDS]
    for name, i in _LISTS.items():
        items = values[i]
        values[i] = orjson.dumps([x.model_dump() for x in items] if name in _ITEMS else items) if items else None
    return tuple(values)


def _lists(row: TelemetryRow) -> dict[str, list[Any]]:
    return {name: orjson.loads(row[i]) if row[i] is not None else [] for name, i in _LISTS.items()}


def unpack_telemetry(row: TelemetryRow) -> Telemetry:
    """The Telemetry `pack_telemetry` was given (equal to it). Its values were validated when the heartbeat came:
    the model is assembled as `model_construct` does, without its per-field Python loop (a decision builds one per
    node it reads: a tenth of the cost)."""
    values = dict(zip(TELEMETRY_FIELDS, row, strict=True))
    for name, i in _LISTS.items():
        if row[i] is None:
            values[name] = ()
        else:
            model = _ITEMS.get(name)
            items = orjson.loads(row[i])
            values[name] = tuple(model.model_validate(x) for x in items) if model is not None else tuple(items)
    telemetry = Telemetry.__new__(Telemetry)
    object.__setattr__(telemetry, "__dict__", values)
    object.__setattr__(telemetry, "__pydantic_fields_set__", set(TELEMETRY_FIELDS))
    object.__setattr__(telemetry, "__pydantic_extra__", None)
    object.__setattr__(telemetry, "__pydantic_private__", None)
    return telemetry


def telemetry_json(row: TelemetryRow) -> dict[str, Any]:
    """`unpack_telemetry(row).model_dump(mode="json")`, without building the model (the store's rolled-up write)."""
    return {**dict(zip(TELEMETRY_FIELDS, row, strict=True)), **_lists(row)}


@dataclass(frozen=True, slots=True)
class NodeRecord:
    capability: Capability
    state: NodeState
    registered_at: float
    last_heartbeat: float
    telemetry_row: TelemetryRow | None = None
    """The latest telemetry, packed (`telemetry` rebuilds it); its active count less the requests seen ending here
    since it came (a heartbeat is seconds old)."""
    outstanding: int = 0
    last_seq: int = 0
    transitions: tuple[tuple[float, str], ...] = ()
    """The last 20 state changes: (when, "old->new: reason")."""

    calibration: Calibration = NO_CALIBRATION
    rtt_ms: float | None = None
    """Smoothed round-trip time of /health probes."""
    probe_failures: int = 0
    probe_streak: int = 0
    last_probe_error: str = ""
    static: NodeStatic = field(default=None)  # type: ignore[assignment]
    """Derived once from the capability (set in __post_init__ when not given)."""
    latency_ewma_s: float | None = None
    """Moving average of observed TTFT (for the latency-ewma baseline policy)."""
    ttft_ratios: tuple[float, ...] = ()
    """Observed / predicted (uncalibrated) TTFT of recent requests (the last 256): their p95 sets the hedge delay."""
    ttft_ratio_p95_: float | None = None
    """Their p95 (`ratio_p95`), kept with them: read on every dispatch, changed once a request."""
    capability_at: float = 0.0
    """When this capability was registered (by this gateway or, on a shared database, another)."""
    via: str | None = None
    """The other gateway this node registered with (None: this one)."""
    claim: str = "judging"
    """Whether its card is what it claims: "judging" (too few answers yet), "held" or "misrepresented"
    (gateway/registry/claims.py)."""
    claim_gap: float = 1.0
    """How much slower than its measured card its first answers showed it (its static card is re-classed by it)."""
    claim_evidence: str = ""

    def __post_init__(self) -> None:
        if self.static is None or self.static.source is not self.capability:
            object.__setattr__(self, "static", NodeStatic.of(self.capability))

    @property
    def node_id(self) -> str:
        return self.capability.node_id

    @property
    def telemetry(self) -> Telemetry | None:
        return None if self.telemetry_row is None else unpack_telemetry(self.telemetry_row)

    @property
    def live(self) -> bool:
        """In a membership state that receives work (whatever its reliability state: see `can_serve`)."""
        return self.state in LIVE

    def ttft_ratio_p95(self) -> float | None:
        return self.ttft_ratio_p95_

    def snapshot(self, book: ReliabilityBook, now: float) -> NodeSnapshot:
        """The node as the scheduler sees it at `now` (built from scratch; the registry keeps a table of these)."""
        return NodeSnapshot(
            node_id=self.capability.node_id,
            state=self.state,
            capability=self.capability,
            telemetry=self.telemetry,
            last_heartbeat=self.last_heartbeat,
            outstanding=self.outstanding,
            reliability=book.summary(self.capability.node_id, now),
            calibration=self.calibration,
            static=self.static,
            latency_ewma_s=self.latency_ewma_s,
        )


def ratio_p95(ratios: tuple[float, ...]) -> float | None:
    """The p95 of TTFT ratios (None with fewer than 8)."""
    if len(ratios) < 8:
        return None
    ordered = sorted(ratios)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def can_serve(state: NodeState, reliability: ReliabilityState) -> bool:
    """The one rule for whether a node may be given work: a live membership state and a reliability state that
    does not block it (ejected, quarantined, banned). The scheduler's node-state filter applies the same sets."""
    return state in LIVE and reliability not in BLOCKED


def assign(record: NodeRecord, **changes: Any) -> None:
    """Change fields of a record in place. Only the registry calls this (tests/unit/test_registry.py scans the
    sources for any other writer)."""
    for name, value in changes.items():
        object.__setattr__(record, name, value)
