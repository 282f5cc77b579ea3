"""The node registry: the one writer of node state, as exo's `event_apply(event, state)`.

Every change to what the gateway knows of a node is an event (events.py) given to `NodeRegistry.apply`, whatever
its source: a node's heartbeat, another gateway's row in the shared database, the ledger replayed at start, a
dispatch, an admin. `apply` changes the records, the reliability book and the scheduler's snapshot table together
and returns the `Effects` that others act on (the membership persists them, logs them, counts them); it does no
I/O and reads no clock (events carry their time).

The snapshot table (`table`) is kept as events arrive: each event that touches a node replaces that node's row
(its reliability columns as of the event), and a decision reads the table instead of building a snapshot of every
node (`NodeRecord.snapshot` is the from-scratch form; tests/unit/test_registry.py holds the two equal). Snapshot
objects are built only for the nodes a decision considers (its sample on a large grid), from the row, and not
kept: what the registry holds per node between events is plain values the cyclic collector does not walk.
"""

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from gridserve.gateway.registry import claims
from gridserve.gateway.registry.claims import MISREPRESENTED
from gridserve.gateway.registry.events import (
    AdminAction,
    Event,
    HeardElsewhere,
    HeartbeatSeen,
    JobObserved,
    Noted,
    ProbeAnswered,
    Registered,
    RequestEnded,
    RequestStarted,
    StateChanged,
    Swept,
)
from gridserve.gateway.registry.record import (
    LIVE,
    T_ACTIVE,
    T_CLOCK,
    T_QUEUED,
    T_TEMP,
    TTFT_RATIOS_KEPT,
    NodeRecord,
    assign,
    can_serve,
    pack_telemetry,
    ratio_p95,
    unpack_telemetry,
)
from gridserve.reliability import (
    BLOCKED,
    CannotRelease,
    EventKind,
    NodeEvent,
    ReliabilityBook,
    ReliabilityState,
    Severity,
    Transition,
)
from gridserve.reliability.book import ReliabilitySummary, SummaryRow
from gridserve.scheduler import NodeSnapshot, NodeStatic
from gridserve.scheduler.baselines import ewma
from gridserve.scheduler.snapshot import C_ACTIVE, C_OUTSTANDING, row_values
from gridserve.scheduler.table import SnapshotTable
from gridserve.types import NodeId, NodeState

TRANSITIONS_KEPT = 20


class Timing(Protocol):
    """The failure detector's thresholds (GatewayConfig has them)."""

    @property
    def heartbeat_interval_s(self) -> float: ...
    @property
    def suspect_after_s(self) -> float: ...
    @property
    def down_after_s(self) -> float: ...
    @property
    def probation_probes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class StateChange:
    """A node's membership state was set (`old` may equal `new`: a re-registration is recorded too)."""

    node_id: NodeId
    old: NodeState
    new: NodeState
    reason: str
    at: float


@dataclass(slots=True)
class Effects:
    """What applying one event did that the outside acts on."""

    applied: bool = True
    """False: nothing changed (an unknown node; a row from another gateway no newer than what is known)."""
    states: list[StateChange] = field(default_factory=list)
    noted: list[NodeEvent] = field(default_factory=list)
    """Ledger events recorded in the book (those not `stored` already: the membership writes them)."""
    transitions: list[Transition] = field(default_factory=list)
    """Reliability state changes they caused."""
    admin_reason: str | None = None
    """Set when the transitions are an admin action's taken here (stored as such, replayed as such)."""


UNCHANGED = Effects(applied=False)
"""Returned for events that change nothing (shared: never mutated)."""


class NodeRegistry:
    def __init__(self, timing: Timing, book: ReliabilityBook | None = None) -> None:
        self.timing = timing
        self.book = book if book is not None else ReliabilityBook()
        self._nodes: dict[NodeId, NodeRecord] = {}
        self._counts = dict.fromkeys(NodeState, 0)
        """Nodes per membership state (kept by every change of state)."""
        self._offences: dict[str, int] = {}
        """Capability misrepresentations found per node (a second follows the severe-incident path)."""
        self._summaries: dict[str, SummaryRow] = {}
        """Each node's reliability summary as of its latest event, packed (what its row and snapshot carry)."""
        self.table = SnapshotTable(build=self._snapshot)
        """The scheduler's view of every node, kept as events arrive."""
        self.nodes: Mapping[NodeId, NodeRecord] = MappingProxyType(self._nodes)
        """Read-only: records change only through `apply`."""
        self._handlers: dict[type, Callable[[Event], Effects]] = {
            Registered: self._registered,  # type: ignore[dict-item]
            HeartbeatSeen: self._heartbeat,  # type: ignore[dict-item]
            HeardElsewhere: self._heard_elsewhere,  # type: ignore[dict-item]
            ProbeAnswered: self._probe,  # type: ignore[dict-item]
            RequestStarted: self._request_started,  # type: ignore[dict-item]
            RequestEnded: self._request_ended,  # type: ignore[dict-item]
            JobObserved: self._job_observed,  # type: ignore[dict-item]
            Noted: self._noted,  # type: ignore[dict-item]
            StateChanged: self._state_changed,  # type: ignore[dict-item]
            AdminAction: self._admin,  # type: ignore[dict-item]
            Swept: self._swept,  # type: ignore[dict-item]
        }

    def apply(self, event: Event) -> Effects:
        """Apply one event: the only way node state changes."""
        return self._handlers[type(event)](event)

    # -- reads ---------------------------------------------------------------------------------------------------
    def can_serve(self, node_id: str, now: float) -> bool:
        """Whether the node may be given work now (record.can_serve: live, and not blocked by its reliability)."""
        record = self._nodes.get(NodeId(node_id))
        return record is not None and can_serve(record.state, self.book.state(node_id, now))

    def trusted(self, node_id: str, now: float) -> bool:
        """Whether the node is known and not blocked by its reliability (ejected, quarantined, banned): out of
        rotation, if it is, only because it did not answer in time."""
        return NodeId(node_id) in self._nodes and self.book.state(node_id, now) not in BLOCKED

    def state_counts(self) -> dict[NodeState, int]:
        """Nodes per membership state (O(1): kept as states change)."""
        return dict(self._counts)

    def summary(self, node_id: str) -> ReliabilitySummary | None:
        """The node's reliability summary as its row holds it (as of its latest event)."""
        row = self._summaries.get(node_id)
        return None if row is None else ReliabilitySummary.unpacked(row)

    # -- registration ----------------------------------------------------------------------------------------------
    def _registered(self, e: Registered) -> Effects:
        """A new record for a (re)registered node; what this gateway learned of it before is kept."""
        cap = e.capability
        node_id = cap.node_id
        previous = self._nodes.get(node_id)
        record = NodeRecord(
            capability=cap,
            state=NodeState.UP if e.via is None else NodeState.DOWN,
            registered_at=e.registered_at,
            last_heartbeat=e.last_seen,
            capability_at=e.capability_at,
            via=e.via,
        )
        if previous is not None:
            assign(
                record,
                outstanding=previous.outstanding,
                calibration=previous.calibration,
                ttft_ratios=previous.ttft_ratios,
                ttft_ratio_p95_=previous.ttft_ratio_p95_,
                latency_ewma_s=previous.latency_ewma_s,
                rtt_ms=previous.rtt_ms,
            )
        self.book.add_node(node_id, e.registered_at)
        effects = Effects()
        self._claim_at_registration(effects, record, previous, e)
        self._nodes[node_id] = record
        self._counts[record.state] += 1
        if previous is not None:
            self._counts[previous.state] -= 1
        if e.via is None:
            self._transition(effects, record, NodeState.UP, "registered", e.at)
        elif e.at - e.last_seen <= self.timing.suspect_after_s:
            self._transition(effects, record, NodeState.UP, f"registered through gateway {e.via}", e.at)
        self._refresh(record, e.at)
        return effects

    def _claim_at_registration(
        self, effects: Effects, record: NodeRecord, previous: NodeRecord | None, e: Registered
    ) -> None:
        """The same card registered again keeps its verdict; a card its micro-benchmark shows far slower than
        claimed is a misrepresentation (recorded by the gateway it registered with)."""
        if previous is not None and previous.capability.hardware == record.capability.hardware:
            assign(record, claim=previous.claim, claim_gap=previous.claim_gap, claim_evidence=previous.claim_evidence)
            if previous.claim_gap != 1.0:
                assign(record, static=NodeStatic.of(record.capability, previous.claim_gap, previous.claim_evidence))
            return
        card = record.static.card
        if card is None or not card.misrepresented:
            return
        assign(record, claim=MISREPRESENTED)
        if e.via is None:
            self._misrepresented(effects, record.capability.node_id, card.evidence, e.at)

    def _misrepresented(self, effects: Effects, node_id: NodeId, evidence: str, at: float) -> None:
        repeat = self._offences.get(node_id, 0) > 0
        self._offences[node_id] = self._offences.get(node_id, 0) + 1
        self._note(effects, claims.incident(node_id, evidence, at, repeat=repeat))

    def _judge_claim(self, effects: Effects, record: NodeRecord, e: JobObserved) -> None:
        """Once enough answers are in: the claim holds, or the node is re-classed at the speed it showed."""
        tele = record.telemetry_row
        clock = tele[T_CLOCK] if tele is not None else None
        verdict = claims.judge(record.static.card, record.calibration, clock, e.raw_predicted_itl_s)
        if verdict.claim == claims.JUDGING:
            return
        if verdict.claim == claims.HELD:
            assign(record, claim=claims.HELD)
            return
        static = NodeStatic.of(record.capability, verdict.gap, verdict.evidence)
        assign(record, claim=MISREPRESENTED, claim_gap=verdict.gap, claim_evidence=verdict.evidence, static=static)
        self._misrepresented(effects, record.capability.node_id, verdict.evidence, e.at or time.time())

    # -- liveness --------------------------------------------------------------------------------------------------
    def _heartbeat(self, e: HeartbeatSeen) -> Effects:
        record = self._nodes.get(e.node_id)
        if record is None:
            return UNCHANGED
        effects = Effects()
        excluded = self.book.state(e.node_id, e.at) in (ReliabilityState.QUARANTINED, ReliabilityState.BANNED)
        if e.seq <= record.last_seq and not excluded:  # one agent counts up; a lower count: a second process
            detail = (
                f"identity: key used from two places at once: heartbeat #{e.seq} after #{record.last_seq}"
                f" (endpoint {record.capability.endpoint})"
            )
            severe = Severity.SEVERE
            self._note(
                effects, NodeEvent(node_id=e.node_id, kind=EventKind.INCIDENT, at=e.at, severity=severe, detail=detail)
            )
        assign(
            record,
            last_heartbeat=e.at,
            telemetry_row=pack_telemetry(e.telemetry),
            last_seq=max(record.last_seq, e.seq),
            via=None,
        )
        if record.state == NodeState.SUSPECT:
            self._transition(effects, record, NodeState.UP, "heartbeat resumed", e.at)
        elif record.state == NodeState.DOWN:
            assign(record, probe_streak=0)
            self._transition(effects, record, NodeState.PROBATION, "heartbeat resumed after being down", e.at)
        self._note(effects, NodeEvent(node_id=e.node_id, kind=EventKind.HEARTBEAT_KEPT, at=e.at))
        self._refresh(record, e.at)
        return effects

    def _heard_elsewhere(self, e: HeardElsewhere) -> Effects:
        """The same effect on liveness as a heartbeat taken here, unless the row is not newer than what is known,
        or too old to prove life (another gateway's late flush)."""
        record = self._nodes.get(e.node_id)
        if record is None or e.last_seen <= record.last_heartbeat:
            return UNCHANGED
        assign(record, last_heartbeat=e.last_seen)
        if e.telemetry is not None:
            assign(record, telemetry_row=pack_telemetry(e.telemetry))
        effects = Effects()
        if e.at - e.last_seen <= self.timing.suspect_after_s:
            if record.state == NodeState.SUSPECT:
                self._transition(effects, record, NodeState.UP, "heartbeat resumed (through another gateway)", e.at)
            elif record.state == NodeState.DOWN:
                assign(record, probe_streak=0)
                reason = "heartbeat resumed after being down (another gateway)"
                self._transition(effects, record, NodeState.PROBATION, reason, e.at)
        self._refresh(record, e.at)
        return effects

    def _probe(self, e: ProbeAnswered) -> Effects:
        """Down needs a failed probe *and* a late heartbeat, so a busy node is not taken for a dead one; back from
        down, a node serves on probation first."""
        record = self._nodes.get(e.node_id)
        if record is None:
            return UNCHANGED
        effects = Effects()
        age = e.at - record.last_heartbeat
        if e.ok:
            rtt = e.rtt_s * 1e3
            smoothed = rtt if record.rtt_ms is None else 0.8 * record.rtt_ms + 0.2 * rtt
            assign(record, rtt_ms=smoothed, probe_failures=0, probe_streak=record.probe_streak + 1)
            if record.state == NodeState.DOWN and age <= self.timing.suspect_after_s:
                assign(record, probe_streak=0)
                reason = "health probe answered and heartbeats are fresh"
                self._transition(effects, record, NodeState.PROBATION, reason, e.at)
            elif record.state == NodeState.PROBATION and record.probe_streak >= self.timing.probation_probes:
                reason = f"probation passed ({record.probe_streak} probes in a row)"
                self._transition(effects, record, NodeState.UP, reason, e.at)
        else:
            assign(record, probe_failures=record.probe_failures + 1, probe_streak=0, last_probe_error=e.error)
            if record.state in LIVE and age > self.timing.heartbeat_interval_s:
                reason = f"health probe failed ({e.error}) and no heartbeat for {age:.1f} s"
                self._transition(effects, record, NodeState.DOWN, reason, e.at)
                missed = NodeEvent(node_id=e.node_id, kind=EventKind.HEARTBEAT_MISSED, at=e.at, detail="probe failed")
                self._note(effects, missed)
            elif record.state == NodeState.UP:
                self._transition(effects, record, NodeState.SUSPECT, f"health probe failed ({e.error})", e.at)
        if effects.states or effects.noted:
            self._refresh(record, e.at)
        return effects

    def _state_changed(self, e: StateChanged) -> Effects:
        record = self._nodes.get(e.node_id)
        if record is None or (e.if_live and record.state not in LIVE):
            return UNCHANGED
        effects = Effects()
        self._transition(effects, record, e.state, e.reason, e.at)
        self._refresh(record, e.at)
        return effects

    def _swept(self, e: Swept) -> Effects:
        """Mark nodes suspect, then down, as their heartbeats age; refresh nodes whose ejection has ended."""
        now = e.at
        suspect_after, down_after = self.timing.suspect_after_s, self.timing.down_after_s
        younger = min(suspect_after, down_after)  # a heartbeat this recent changes nothing: one comparison
        effects = Effects()
        for record in self._nodes.values():
            age = now - record.last_heartbeat
            if age <= younger:
                continue
            node_id = record.capability.node_id
            if age > down_after and record.state in LIVE:
                self._transition(effects, record, NodeState.DOWN, f"no heartbeat for {age:.1f} s", now)
                self._note(effects, NodeEvent(node_id=node_id, kind=EventKind.HEARTBEAT_MISSED, at=now, detail="down"))
                self._refresh(record, now)
            elif age > suspect_after and record.state == NodeState.UP:
                self._transition(effects, record, NodeState.SUSPECT, f"no heartbeat for {age:.1f} s", now)
                missed = NodeEvent(node_id=node_id, kind=EventKind.HEARTBEAT_MISSED, at=now, detail="suspect")
                self._note(effects, missed)
                self._refresh(record, now)
        for ended in self.book.ejections_ended(now):
            self.refresh(ended, now)  # reads the book at `now`: the ejection becomes probation
        return effects

    # -- work in flight and what finished work taught ----------------------------------------------------------------
    def _request_started(self, e: RequestStarted) -> Effects:
        record = self._nodes.get(e.node_id)
        if record is None:
            return UNCHANGED
        assign(record, outstanding=record.outstanding + 1)
        self._load_changed(record)
        return Effects()

    def _request_ended(self, e: RequestEnded) -> Effects:
        record = self._nodes.get(e.node_id)
        if record is None:
            return UNCHANGED
        # The node's last heartbeat counted this request as active, and says so until the next one (seconds): a node
        # that just answered would look busy. Its reported count drops with each request seen ending here.
        tele = record.telemetry_row
        if tele is not None and tele[T_ACTIVE] > 0:
            tele = (*tele[:T_ACTIVE], tele[T_ACTIVE] - 1, *tele[T_ACTIVE + 1 :])
        assign(record, outstanding=max(0, record.outstanding - 1), telemetry_row=tele)
        self._load_changed(record)
        return Effects()

    def _job_observed(self, e: JobObserved) -> Effects:
        """The latency average, the TTFT ratio (hedge delay) and the calibration."""
        record = self._nodes.get(e.node_id)
        if record is None:
            return UNCHANGED
        assign(record, latency_ewma_s=ewma(record.latency_ewma_s, e.ttft_s))
        if e.raw_predicted_ttft_s is not None:
            if e.fresh_ttft_s is not None and e.raw_predicted_ttft_s > 0:
                ratios = (*record.ttft_ratios, e.fresh_ttft_s / e.raw_predicted_ttft_s)[-TTFT_RATIOS_KEPT:]
                assign(record, ttft_ratios=ratios, ttft_ratio_p95_=ratio_p95(ratios))
            predicted, observed = (e.raw_predicted_ttft_s, e.fresh_ttft_s) if e.service is None else e.service
            calibration = record.calibration.observe(
                predicted_ttft_s=predicted if observed is not None else 0.0,
                observed_ttft_s=observed or 0.0,
                predicted_itl_s=e.raw_predicted_itl_s,
                observed_itl_s=e.itl_s,
                output_tokens=e.completion_tokens,
            )
            assign(record, calibration=calibration)
        effects = Effects()
        if record.claim == claims.JUDGING:
            self._judge_claim(effects, record, e)
        self._refresh(record, None)
        return effects

    # -- reliability -------------------------------------------------------------------------------------------------
    def _noted(self, e: Noted) -> Effects:
        effects = Effects()
        if e.stored:
            effects.transitions = self.book.record(e.event)
        else:
            self._note(effects, e.event)
        record = self._nodes.get(NodeId(e.event.node_id))
        if record is not None:
            self._refresh(record, e.event.at)
        return effects

    def _admin(self, e: AdminAction) -> Effects:
        effects = Effects(admin_reason=None if e.stored else e.reason)
        if e.action == "quarantine":
            effects.transitions = self.book.quarantine(e.node_id, reason=e.reason, now=e.at)
        elif e.stored:
            with contextlib.suppress(CannotRelease):  # a ban that came later in the ledger wins
                effects.transitions = self.book.release(e.node_id, reason=e.reason, now=e.at)
        else:
            effects.transitions = self.book.release(e.node_id, reason=e.reason, now=e.at)
        record = self._nodes.get(e.node_id)
        if record is not None:
            self._refresh(record, e.at)
        return effects

    def refresh(self, node_id: str, at: float) -> None:
        """Re-read a node's reliability into its row (after the book changed by a path that is not an event)."""
        record = self._nodes.get(NodeId(node_id))
        if record is not None:
            self._refresh(record, at)

    # -- internals ---------------------------------------------------------------------------------------------------
    def _note(self, effects: Effects, event: NodeEvent) -> None:
        effects.transitions += self.book.record(event)
        effects.noted.append(event)

    def _transition(self, effects: Effects, record: NodeRecord, state: NodeState, reason: str, at: float) -> None:
        old = record.state
        kept = (*record.transitions, (at, f"{old.value}->{state.value}: {reason}"))[-TRANSITIONS_KEPT:]
        assign(record, state=state, transitions=kept)
        self._counts[old] -= 1
        self._counts[state] += 1
        effects.states.append(StateChange(record.capability.node_id, old, state, reason, at))

    def _refresh(self, record: NodeRecord, at: float | None) -> None:
        """Replace the node's row; its reliability summary is read again at `at` (None: kept as it was)."""
        node_id = record.capability.node_id
        if at is not None or node_id not in self._summaries:
            self._summaries[node_id] = self.book.summary_row(node_id, at if at is not None else 0.0)
        self.table.put_row(node_id, record.static, self._row(record))

    def _load_changed(self, record: NodeRecord) -> None:
        """Only the load columns moved (a request started or ended: thousands a second on a busy grid)."""
        tele = record.telemetry_row
        active = tele[T_ACTIVE] if tele is not None else 0
        cells = {C_ACTIVE: float(max(record.outstanding, active)), C_OUTSTANDING: float(record.outstanding)}
        self.table.set_cells(record.capability.node_id, cells)

    def _row(self, record: NodeRecord) -> tuple[float, ...]:
        rel = self._summaries[record.capability.node_id]
        tele = record.telemetry_row
        return row_values(
            state=record.state,
            last_heartbeat=record.last_heartbeat,
            outstanding=record.outstanding,
            active=tele[T_ACTIVE] if tele is not None else 0,
            queued=tele[T_QUEUED] if tele is not None else 0,
            clock_ratio=tele[T_CLOCK] if tele is not None else None,
            temperature_c=tele[T_TEMP] if tele is not None else None,
            reliability=(rel[0], rel[5], rel[7], rel[8]),
            calibration=record.calibration,
            price_per_mtok=record.capability.price_per_mtok,
            static=record.static,
            latency_ewma_s=record.latency_ewma_s,
        )

    def _snapshot(self, node_id: str, row: bytes) -> NodeSnapshot:
        """The node's snapshot as its row describes it (the table's `build`; `row` is the one the table holds)."""
        record = self._nodes[NodeId(node_id)]
        tele = record.telemetry_row
        return NodeSnapshot(
            node_id=record.capability.node_id,
            state=record.state,
            capability=record.capability,
            telemetry=unpack_telemetry(tele) if tele is not None else None,
            last_heartbeat=record.last_heartbeat,
            outstanding=record.outstanding,
            reliability=ReliabilitySummary.unpacked(self._summaries[node_id]),
            calibration=record.calibration,
            static=record.static,
            latency_ewma_s=record.latency_ewma_s,
            known_row=row,
        )
