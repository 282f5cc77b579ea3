"""Membership: signed registration and heartbeat intake, and the failure detector that marks nodes down."""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.perfmodel import Calibration
from gridserve.reliability import EventKind, NodeEvent, ReliabilityBook, ReliabilityState, Severity, Transition
from gridserve.scheduler import NodeSnapshot, NodeStatic
from gridserve.scheduler.baselines import ewma
from gridserve.store import StoreWriter
from gridserve.trust import EnvelopeVerifier, Malformed, TrustError, WrongSigner, node_id_for
from gridserve.trust.attestation import attest, builtin_digests, load_digests, merged
from gridserve.types import Capability, HeartbeatPayload, NodeId, NodeState, RegisterPayload, Telemetry
from gridserve.types.base import from_wire

log = logging.getLogger("gridserve.gateway")


LIVE = frozenset({NodeState.UP, NodeState.SUSPECT, NodeState.PROBATION})
"""States in which a node receives work (probation: ranked lower)."""


class UnknownNode(TrustError):
    kind = "unknown_node"


@dataclass
class NodeRecord:
    capability: Capability
    state: NodeState
    registered_at: float
    last_heartbeat: float
    telemetry: Telemetry | None = None
    outstanding: int = 0
    last_seq: int = 0
    transitions: list[tuple[float, str]] = field(default_factory=list)

    calibration: Calibration = field(default_factory=Calibration)
    rtt_ms: float | None = None
    """Smoothed round-trip time of /health probes."""
    probe_failures: int = 0
    probe_streak: int = 0
    last_probe_error: str = ""
    static: NodeStatic | None = None
    latency_ewma_s: float | None = None
    """Moving average of observed TTFT (for the latency-ewma baseline policy)."""
    ttft_ratios: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    """Observed / predicted (uncalibrated) TTFT of recent requests: their p95 sets the hedge delay."""
    capability_at: float = 0.0
    """When this capability was registered (by this gateway or, on a shared database, another)."""
    via: str | None = None
    """The other gateway this node registered with (None: this one)."""

    def ttft_ratio_p95(self) -> float | None:
        if len(self.ttft_ratios) < 8:
            return None
        ordered = sorted(self.ttft_ratios)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    def snapshot(self, book: ReliabilityBook, now: float) -> NodeSnapshot:
        if self.static is None:
            self.static = NodeStatic.of(self.capability)
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


class Membership:
    def __init__(
        self,
        config: GatewayConfig,
        verifier: EnvelopeVerifier,
        writer: StoreWriter,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.writer = writer
        self.metrics = metrics
        self.clock = clock
        self.nodes: dict[NodeId, NodeRecord] = {}
        self.book = ReliabilityBook()
        extra = load_digests(config.allowed_digests_path) if config.allowed_digests_path else {}
        self.allowed_digests = merged(builtin_digests(), extra)
        """Model -> weights digests a node may offer it with (trust/attestation.py)."""
        self._pending_events: list[dict[str, Any]] = []
        self._pending_beats: dict[str, dict[str, Any]] = {}
        """Latest heartbeat per node since the last flush: rolled up into one write (not a row per beat)."""

    # -- intake ---------------------------------------------------------------------------------
    def reject(self, exc: TrustError, *, path: str, remote: str, node_id: str | None = None) -> None:
        """Record a refused node message (a security event) and count it."""
        self.metrics.rejections.labels(reason=exc.kind).inc()
        log.warning("refused %s from %s: %s (%s)", path, remote, exc.kind, exc.detail)
        self.writer.submit(
            self.writer.store.record_event,
            kind="protocol_rejected",
            severity="minor",
            node_id=node_id,
            detail={"reason": exc.kind, "detail": exc.detail, "path": path, "remote": remote},
            at=self.clock(),
        )

    def register(self, body: bytes) -> Capability:
        envelope = self.verifier.verify(body, purpose="register")
        try:
            capability = from_wire(RegisterPayload, envelope.payload).capability
        except ValidationError as exc:
            raise Malformed(
                f"capability document invalid: {exc.error_count()} error(s): {exc.errors()[0]['msg']}"
            ) from exc
        if capability.public_key != envelope.keyid or capability.node_id != node_id_for(envelope.keyid):
            raise WrongSigner("capability names a key or node id other than the signing key's")
        unattested = attest(capability.models, self.allowed_digests)
        if unattested:
            log.warning("node %s serves unattested model(s): %s", capability.node_id, ", ".join(unattested))
        now = self.clock()
        record = self._install(capability, registered_at=now, capability_at=now, last_seen=now, via=None)
        self._transition(record, NodeState.UP, "registered")
        self.writer.submit(
            self.writer.store.upsert_node,
            capability.node_id,
            public_key=capability.public_key,
            capability=capability.model_dump(mode="json"),
            state=NodeState.UP.value,
            at=now,
        )
        log.info(
            "node %s registered (%s, %s)",
            capability.node_id,
            capability.engine,
            ", ".join(m.name for m in capability.models),
        )
        return capability

    def _install(
        self, capability: Capability, *, registered_at: float, capability_at: float, last_seen: float, via: str | None
    ) -> NodeRecord:
        """A new record for a (re)registered node; what this gateway learned of it before is kept."""
        previous = self.nodes.get(capability.node_id)
        record = NodeRecord(
            capability=capability,
            state=NodeState.UP,
            registered_at=registered_at,
            last_heartbeat=last_seen,
            capability_at=capability_at,
            via=via,
        )
        if previous is not None:
            record.outstanding = previous.outstanding
            record.calibration = previous.calibration
            record.ttft_ratios = previous.ttft_ratios
            record.latency_ewma_s = previous.latency_ewma_s
            record.rtt_ms = previous.rtt_ms
        self.book.add_node(capability.node_id, registered_at)
        self.nodes[capability.node_id] = record
        return record

    def adopt(
        self, capability: Capability, *, registered_at: float, capability_at: float, last_seen: float, via: str
    ) -> NodeRecord:
        """A node that registered with another gateway on the same database (its signed registration was checked
        there; this gateway probes it and judges its liveness itself)."""
        unattested = attest(capability.models, self.allowed_digests)
        if unattested:
            log.warning("node %s serves unattested model(s): %s", capability.node_id, ", ".join(unattested))
        fresh = self.clock() - last_seen <= self.config.suspect_after_s
        record = self._install(
            capability, registered_at=registered_at, capability_at=capability_at, last_seen=last_seen, via=via
        )
        record.state = NodeState.DOWN
        if fresh:
            self._transition(record, NodeState.UP, f"registered through gateway {via}")
        log.info("node %s adopted from gateway %s (%s)", capability.node_id, via, capability.engine)
        return record

    def heard_elsewhere(self, record: NodeRecord, *, last_seen: float, telemetry: Telemetry | None) -> bool:
        """Another gateway took a heartbeat from this node (as stored in the shared database): the same effect
        on liveness as one taken here. False if it is not newer than what this gateway knows."""
        if last_seen <= record.last_heartbeat:
            return False
        record.last_heartbeat = last_seen
        if telemetry is not None:
            record.telemetry = telemetry
        if self.clock() - last_seen > self.config.suspect_after_s:
            return True  # an old row (another gateway's late flush): no proof of life
        if record.state == NodeState.SUSPECT:
            self._transition(record, NodeState.UP, "heartbeat resumed (through another gateway)")
        elif record.state == NodeState.DOWN:
            record.probe_streak = 0
            self._transition(record, NodeState.PROBATION, "heartbeat resumed after being down (another gateway)")
        return True

    def heartbeat(self, body: bytes) -> NodeRecord:
        envelope = self.verifier.verify(body, purpose="heartbeat")
        node_id = NodeId(node_id_for(envelope.keyid))
        record = self.nodes.get(node_id)
        if record is None:
            raise UnknownNode(f"heartbeat from unregistered node {node_id}")
        try:
            beat = from_wire(HeartbeatPayload, envelope.payload)
        except ValidationError as exc:
            raise Malformed(f"heartbeat invalid: {exc.errors()[0]['msg']}") from exc
        if beat.node_id != node_id:
            raise WrongSigner("heartbeat names another node than its signer")
        now = self.clock()
        excluded = self.book.state(node_id, now) in (ReliabilityState.QUARANTINED, ReliabilityState.BANNED)
        if beat.seq <= record.last_seq and not excluded:  # one agent counts up; a lower count: a second process
            self.note(
                NodeEvent(
                    node_id=node_id,
                    kind=EventKind.INCIDENT,
                    at=now,
                    severity=Severity.SEVERE,
                    detail=f"identity: key used from two places at once: heartbeat #{beat.seq} after #{record.last_seq}"
                    f" (endpoint {record.capability.endpoint})",
                )
            )
        record.last_heartbeat = now
        record.telemetry = beat.telemetry
        record.last_seq = max(record.last_seq, beat.seq)
        if record.state == NodeState.SUSPECT:
            self._transition(record, NodeState.UP, "heartbeat resumed")
        elif record.state == NodeState.DOWN:
            record.probe_streak = 0
            self._transition(record, NodeState.PROBATION, "heartbeat resumed after being down")
        self.note(NodeEvent(node_id=node_id, kind=EventKind.HEARTBEAT_KEPT, at=now))
        self._pending_beats[node_id] = {"node_id": node_id, "telemetry": beat.telemetry, "at": now}
        record.via = None
        return record

    # -- failure detection ------------------------------------------------------------------------
    def sweep(self) -> None:
        """Mark nodes suspect, then down, as their heartbeats age; count nodes per state (one pass)."""
        now = self.clock()
        suspect_after, down_after = self.config.suspect_after_s, self.config.down_after_s
        younger = min(suspect_after, down_after)  # a heartbeat this recent changes nothing: one comparison
        counts = dict.fromkeys(NodeState, 0)
        for record in self.nodes.values():
            age = now - record.last_heartbeat
            if age > younger:
                node_id = record.capability.node_id
                if age > down_after and record.state in LIVE:
                    self._transition(record, NodeState.DOWN, f"no heartbeat for {age:.1f} s")
                    self.note(NodeEvent(node_id=node_id, kind=EventKind.HEARTBEAT_MISSED, at=now, detail="down"))
                elif age > suspect_after and record.state == NodeState.UP:
                    self._transition(record, NodeState.SUSPECT, f"no heartbeat for {age:.1f} s")
                    self.note(NodeEvent(node_id=node_id, kind=EventKind.HEARTBEAT_MISSED, at=now, detail="suspect"))
            counts[record.state] += 1
        for state, count in counts.items():
            self.metrics.node_states.labels(state=state.value).set(count)

    def mark_failed(self, node_id: NodeId, reason: str) -> None:
        """A dispatch could not reach the node: take it out of rotation until it heartbeats again."""
        record = self.nodes.get(node_id)
        if record is not None and record.state in LIVE:
            self._transition(record, NodeState.DOWN, reason)

    # -- work in flight and what finished work taught (written here only) ------------------------------
    def request_started(self, node_id: NodeId) -> bool:
        """An attempt was sent to the node (False: it is not on the grid)."""
        record = self.nodes.get(node_id)
        if record is None:
            return False
        record.outstanding += 1
        return True

    def request_ended(self, node_id: NodeId) -> None:
        """An attempt on the node ended, however it ended."""
        record = self.nodes.get(node_id)
        if record is not None:
            record.outstanding = max(0, record.outstanding - 1)

    def observed_timing(
        self,
        node_id: NodeId,
        *,
        ttft_s: float,
        raw_predicted_ttft_s: float | None,
        fresh_ttft_s: float | None,
        raw_predicted_itl_s: float,
        itl_s: float | None,
    ) -> None:
        """A completed request's timings: the latency average, the TTFT ratio (hedge delay) and the calibration.
        `fresh_ttft_s` is the TTFT of a segment that did not resume another node's work (None otherwise)."""
        record = self.nodes.get(node_id)
        if record is None:
            return
        record.latency_ewma_s = ewma(record.latency_ewma_s, ttft_s)
        if raw_predicted_ttft_s is None:
            return
        if fresh_ttft_s is not None and raw_predicted_ttft_s > 0:
            record.ttft_ratios.append(fresh_ttft_s / raw_predicted_ttft_s)
        record.calibration = record.calibration.observe(
            predicted_ttft_s=raw_predicted_ttft_s if fresh_ttft_s is not None else 0.0,
            observed_ttft_s=fresh_ttft_s or 0.0,
            predicted_itl_s=raw_predicted_itl_s,
            observed_itl_s=itl_s,
        )

    def probe_result(self, node_id: NodeId, *, ok: bool, rtt_s: float, error: str = "") -> None:
        """An active /health probe answered (ok) or not. Down needs a failed probe *and* a late heartbeat, so a
        busy node is not taken for a dead one; back from down, a node serves on probation first."""
        record = self.nodes.get(node_id)
        if record is None:
            return
        now = self.clock()
        age = now - record.last_heartbeat
        if ok:
            rtt = rtt_s * 1e3
            record.rtt_ms = rtt if record.rtt_ms is None else 0.8 * record.rtt_ms + 0.2 * rtt
            record.probe_failures, record.probe_streak = 0, record.probe_streak + 1
            if record.state == NodeState.DOWN and age <= self.config.suspect_after_s:
                record.probe_streak = 0
                self._transition(record, NodeState.PROBATION, "health probe answered and heartbeats are fresh")
            elif record.state == NodeState.PROBATION and record.probe_streak >= self.config.probation_probes:
                self._transition(record, NodeState.UP, f"probation passed ({record.probe_streak} probes in a row)")
            return
        record.probe_failures, record.probe_streak, record.last_probe_error = record.probe_failures + 1, 0, error
        if record.state in LIVE and age > self.config.heartbeat_interval_s:
            self._transition(record, NodeState.DOWN, f"health probe failed ({error}) and no heartbeat for {age:.1f} s")
            self.note(NodeEvent(node_id=node_id, kind=EventKind.HEARTBEAT_MISSED, at=now, detail="probe failed"))
        elif record.state == NodeState.UP:
            self._transition(record, NodeState.SUSPECT, f"health probe failed ({error})")

    def _transition(self, record: NodeRecord, state: NodeState, reason: str) -> None:
        old = record.state
        record.state = state
        now = self.clock()
        record.transitions.append((now, f"{old.value}->{state.value}: {reason}"))
        del record.transitions[:-20]
        node_id = record.capability.node_id
        if old != state:
            log.info("node %s: %s -> %s (%s)", node_id, old.value, state.value, reason)
        self.writer.submit(self.writer.store.set_node_state, node_id, state.value, now)
        self.writer.submit(
            self.writer.store.record_event,
            kind="state",
            severity="minor",
            node_id=node_id,
            detail={"from": old.value, "to": state.value, "reason": reason},
            at=now,
        )

    # -- reliability --------------------------------------------------------------------------------
    def note(self, event: NodeEvent) -> list[Transition]:
        """Feed the reliability ledger; persist the event (and any state change it causes)."""
        transitions = self.book.record(event)
        if event.kind == EventKind.INCIDENT:
            self.metrics.incidents.labels(severity=event.severity.value).inc()
        if event.kind != EventKind.HEARTBEAT_KEPT:  # kept heartbeats are counted, not stored one by one
            self._pending_events.append(
                dict(
                    kind=event.kind.value,
                    severity=event.severity.value,
                    node_id=event.node_id,
                    detail={"detail": event.detail, "within_slo": event.within_slo},
                    at=event.at,
                )
            )
        self.persist_transitions(transitions)
        return transitions

    def flush_events(self) -> None:
        """Hand buffered ledger events and the latest heartbeat of each node to the store writer as batches
        (called by the sweeper, several times per heartbeat interval, and at exit)."""
        if self._pending_events:
            rows, self._pending_events = self._pending_events, []
            self.writer.submit(self.writer.store.record_events, rows)
        if self._pending_beats:
            beats, self._pending_beats = list(self._pending_beats.values()), {}
            for beat in beats:  # serialised here, once per node and flush, not per heartbeat
                beat["telemetry"] = beat["telemetry"].model_dump(mode="json")
            self.writer.submit(self.writer.store.touch_nodes, beats)

    async def durable(self, timeout_s: float = 10.0) -> None:
        """Wait until every event noted so far is committed to the store (admin answers wait for this, so an
        acknowledged action survives a gateway crash)."""
        self.flush_events()
        await asyncio.to_thread(self.writer.flush, timeout_s)

    def persist_transitions(self, transitions: list[Transition], admin_reason: str | None = None) -> None:
        """Store state changes; `admin_reason` marks an admin action (replayed as such on restart)."""
        for t in transitions:
            log.warning("node %s reliability: %s -> %s (%s)", t.node_id, t.old.value, t.new.value, t.reason)
            self.writer.submit(
                self.writer.store.record_event,
                kind="reliability_state",
                severity="minor",
                node_id=t.node_id,
                detail={"from": t.old.value, "to": t.new.value, "reason": t.reason, "admin_reason": admin_reason},
                at=t.at,
            )

    # -- views ----------------------------------------------------------------------------------
    def snapshots(self) -> list[NodeSnapshot]:
        now = self.clock()
        return [record.snapshot(self.book, now) for record in self.nodes.values()]

    def live_models(self) -> dict[str, list[NodeRecord]]:
        models: dict[str, list[NodeRecord]] = {}
        for record in self.nodes.values():
            if record.state in LIVE:
                whole = {o.name for o in record.capability.models if o.layers is None}  # stages: gateway/pipeline/session.py
                names = whole | set(record.capability.loadable_models)
                for name in sorted(names):
                    models.setdefault(name, []).append(record)
        return models

    def describe(self, record: NodeRecord) -> dict[str, Any]:
        cap = record.capability
        return {
            "node_id": cap.node_id,
            "public_key": cap.public_key,
            "state": record.state.value,
            "endpoint": cap.endpoint,
            "engine": cap.engine,
            "emulated": cap.hardware.emulated,
            "models": [m.model_dump(mode="json") for m in cap.models],
            "loadable_models": list(cap.loadable_models),
            "hardware": cap.hardware.model_dump(mode="json"),
            "runtime": cap.runtime.model_dump(mode="json"),
            "price_per_mtok": cap.price_per_mtok,
            "telemetry": record.telemetry.model_dump(mode="json") if record.telemetry else None,
            "outstanding": record.outstanding,
            "registered_at": record.registered_at,
            "last_heartbeat": record.last_heartbeat,
            "heartbeat_age_s": round(self.clock() - record.last_heartbeat, 3),
            "via_gateway": record.via,
            "transitions": [{"at": t, "what": w} for t, w in record.transitions[-5:]],
            "rtt_ms": None if record.rtt_ms is None else round(record.rtt_ms, 3),
            "probe_failures": record.probe_failures,
            "reliability": _summary_dict(self.book.summary(cap.node_id, self.clock())),
            "calibration": {
                "ttft_factor": round(record.calibration.ttft_factor, 4),
                "itl_factor": round(record.calibration.itl_factor, 4),
                "samples": record.calibration.samples,
            },
        }


def _summary_dict(summary: Any) -> dict[str, Any]:
    out = {k: getattr(summary, k) for k in summary.__dataclass_fields__}
    out["state"] = summary.state.value
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
