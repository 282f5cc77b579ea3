"""Membership: signed registration and heartbeat intake, the failure detector, and what they write.

The state itself is the node registry's (registry.py: the one writer of node records, the reliability book and
the scheduler's snapshot table); this is its door to the world: it verifies node messages, turns them and every
other observation into registry events, and persists, logs and counts what applying them did. Readers use
`nodes` (read-only), `book` and `snapshots()`.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from pydantic import ValidationError

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.ops.gcwatch import FREEZER, Freezer
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.admission import RefusalRecorder
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
from gridserve.gateway.registry.record import LIVE, NodeRecord, TelemetryRow, pack_telemetry, telemetry_json
from gridserve.gateway.registry.registry import Effects, NodeRegistry
from gridserve.gateway.registry.whitewash import Marks, Signals, signals_of
from gridserve.reliability import EXCLUDED, EventKind, NodeEvent, ReliabilityBook, Severity, Transition
from gridserve.scheduler.table import TableView
from gridserve.store import StoreWriter
from gridserve.trust import EnvelopeVerifier, Malformed, TrustError, WrongSigner, node_id_for
from gridserve.trust.attestation import attest, builtin_digests, check_names, load_digests, merged
from gridserve.types import Capability, HeartbeatPayload, NodeId, NodeState, RegisterPayload, Telemetry
from gridserve.types.base import lenient

log = logging.getLogger("gridserve.gateway")

__all__ = ["LIVE", "Membership", "NodeRecord", "UnknownNode"]


class UnknownNode(TrustError):
    kind = "unknown_node"


class Membership:
    def __init__(
        self,
        config: GatewayConfig,
        verifier: EnvelopeVerifier,
        writer: StoreWriter,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
        freezer: Freezer = FREEZER,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.writer = writer
        self.metrics = metrics
        self.clock = clock
        self.registry = NodeRegistry(config, ReliabilityBook(config.reliability))
        self.marks = Marks()
        """Where quarantined identities came from (gateway/registry/whitewash.py)."""
        self.refusals = RefusalRecorder(config.rejections_recorded_per_s)
        self.freezer = freezer
        """Moves what registrations built out of the collector's reach (on where the gateway's GC watch runs)."""
        extra = load_digests(config.allowed_digests_path) if config.allowed_digests_path else {}
        self.allowed_digests = merged(builtin_digests(emulated=config.allow_emulated), extra)
        """Model -> weights digests a node may offer it with (trust/attestation.py)."""
        self._pending_events: list[dict[str, Any]] = []
        self._pending_beats: dict[str, tuple[float, TelemetryRow]] = {}
        """Latest heartbeat per node since the last flush: rolled up into one write (not a row per beat)."""
        self.on_registered: list[Callable[[Capability], None]] = []
        """Told of every (re)registration, here or adopted from another gateway (a restarted node starts empty)."""
        self.on_down: list[Callable[[NodeId], None]] = []
        """Told when a node is marked down."""

    @property
    def nodes(self) -> Mapping[NodeId, NodeRecord]:
        """Every node's record (read-only: they change through `apply`)."""
        return self.registry.nodes

    @property
    def book(self) -> ReliabilityBook:
        return self.registry.book

    # -- the one way in --------------------------------------------------------------------------------------------
    def apply(self, event: Event) -> Effects:
        """Apply an event to the registry and write, log and count what it did."""
        effects = self.registry.apply(event)
        if effects.applied:
            self._persist(effects)
            self._tell(event, effects)
        return effects

    def _tell(self, event: Event, effects: Effects) -> None:
        for transition in effects.transitions:
            if transition.new in EXCLUDED:
                self.marks.fell(transition.node_id, transition.at)
        if isinstance(event, Registered):
            for registered in self.on_registered:
                registered(event.capability)
        for change in effects.states:
            if change.new == NodeState.DOWN and change.old != NodeState.DOWN:
                for down in self.on_down:
                    down(change.node_id)

    # -- intake ---------------------------------------------------------------------------------------------------
    def reject(self, exc: TrustError, *, path: str, remote: str, node_id: str | None = None) -> None:
        """Count a refused node message (a security event) and, within the rate at which refusals are written down
        (gateway/registry/admission.py), record it with how many went unrecorded before it. The detail is bounded
        (TrustError) and never holds the message itself."""
        self.metrics.rejections.labels(reason=exc.kind).inc()
        unrecorded = self.refusals.admit(time.monotonic())
        if unrecorded is None:
            return
        log.warning("refused %s from %s: %s (%s)", path, remote, exc.kind, exc.detail)
        detail: dict[str, Any] = {"reason": exc.kind, "detail": exc.detail, "path": path[:200], "remote": remote}
        if unrecorded:
            detail["unrecorded_before"] = unrecorded
        self.writer.submit(
            self.writer.store.record_event,
            kind="protocol_rejected",
            severity="minor",
            node_id=node_id,
            detail=detail,
            at=self.clock(),
        )

    def register(self, body: bytes, remote: str = "") -> tuple[Capability, tuple[str, ...]]:
        """A node's signed registration (`remote`: the address it came from): its capability, and the fields of
        its document this version does not know (a newer node's; left out, `types.base.lenient`)."""
        envelope = self.verifier.verify(body, purpose="register")
        try:
            payload, unknown = lenient(RegisterPayload, envelope.payload)
            capability = payload.capability
        except ValidationError as exc:
            raise Malformed(
                f"capability document invalid: {exc.error_count()} error(s): {exc.errors()[0]['msg']}"
            ) from exc
        if capability.public_key != envelope.keyid or capability.node_id != node_id_for(envelope.keyid):
            raise WrongSigner("capability names a key or node id other than the signing key's")
        self._attest(capability)
        now = self.clock()
        fresh = not self.book.knows(capability.node_id)
        self.apply(Registered(capability, at=now, registered_at=now, capability_at=now, last_seen=now))
        self._whitewash(capability.node_id, signals_of(capability, remote), fresh, now)
        self.freezer.grew()
        self.writer.submit(
            self.writer.store.upsert_node,
            capability.node_id,
            public_key=capability.public_key,
            capability=capability.model_dump(mode="json"),
            state=NodeState.UP.value,
            at=now,
            address=None if remote == "?" else remote,
        )
        log.info(
            "node %s registered (%s, %s)",
            capability.node_id,
            capability.engine,
            ", ".join(m.name for m in capability.models),
        )
        if unknown:
            log.warning(
                "node %s (a newer version?) sent fields this gateway does not read: %s",
                capability.node_id,
                ", ".join(unknown),
            )
        return capability, unknown

    def _whitewash(self, node_id: NodeId, signals: Signals, fresh: bool, now: float) -> None:
        """A new identity from where a quarantined one was owes more checks (SIGNALS_MATCHED)."""
        self.marks.registered(node_id, signals)
        matches = self.marks.matches(node_id, signals, now) if fresh else []
        if matches:
            detail = "registered with the " + "; ".join(m.describe() for m in matches)
            log.warning("new node %s %s: it owes more checks before it is established", node_id, detail)
            self.note(NodeEvent(node_id=node_id, kind=EventKind.SIGNALS_MATCHED, at=now, detail=detail))

    def adopt(
        self, capability: Capability, *, registered_at: float, capability_at: float, last_seen: float, via: str
    ) -> NodeRecord:
        """A node that registered with another gateway on the same database (its signed registration was checked
        there; this gateway probes it and judges its liveness itself)."""
        self._attest(capability)
        event = Registered(
            capability,
            at=self.clock(),
            registered_at=registered_at,
            capability_at=capability_at,
            last_seen=last_seen,
            via=via,
        )
        self.apply(event)
        self.freezer.grew()
        log.info("node %s adopted from gateway %s (%s)", capability.node_id, via, capability.engine)
        return self.nodes[capability.node_id]

    def _attest(self, capability: Capability) -> None:
        unlisted_ok = self.config.allow_unlisted_models
        unattested = attest(capability.models, self.allowed_digests, unlisted_ok=unlisted_ok)
        names = (*capability.loadable_models, *capability.stage_models)
        check_names(names, self.allowed_digests, unlisted_ok=unlisted_ok)
        if unattested:
            log.warning("node %s serves unattested model(s): %s", capability.node_id, ", ".join(unattested))

    def heard_elsewhere(self, record: NodeRecord, *, last_seen: float, telemetry: Telemetry | None) -> bool:
        """Another gateway took a heartbeat from this node (as stored in the shared database): the same effect
        on liveness as one taken here. False if it is not newer than what this gateway knows."""
        event = HeardElsewhere(record.capability.node_id, at=self.clock(), last_seen=last_seen, telemetry=telemetry)
        return self.apply(event).applied

    def heartbeat(self, body: bytes) -> NodeRecord:
        """A node's signed heartbeat: signature, freshness and replay checked, its payload checked and applied."""
        envelope = self.verifier.verify(body, purpose="heartbeat")
        node_id = NodeId(node_id_for(envelope.keyid))
        record = self.nodes.get(node_id)
        if record is None:
            raise UnknownNode(f"heartbeat from unregistered node {node_id}")
        try:
            beat, _ = lenient(HeartbeatPayload, envelope.payload)
        except ValidationError as exc:
            raise Malformed(f"heartbeat invalid: {exc.errors()[0]['msg']}") from exc
        return self._beat(record, beat)

    def channel_heartbeat(self, node_id: NodeId, payload: bytes) -> NodeRecord:
        """A heartbeat that came over the node's own tunnel as a bare payload (JSON of `HeartbeatPayload`, no
        envelope). The channel authenticates it: every frame's tag is keyed by a secret only the holder of the node's
        key shares with this gateway (tunnel/channel.py), and its counter makes a replayed or reordered frame fail,
        so the signature, freshness and nonce checks of `heartbeat` would prove nothing more."""
        record = self.nodes.get(node_id)
        if record is None:
            raise UnknownNode(f"heartbeat from unregistered node {node_id}")
        try:
            beat = HeartbeatPayload.model_validate_json(payload)
        except ValidationError:
            beat = self._newer_beat(payload)
        return self._beat(record, beat)

    @staticmethod
    def _newer_beat(payload: bytes) -> HeartbeatPayload:
        """A heartbeat with fields this version does not read (a newer node's): read without them."""
        try:
            return lenient(HeartbeatPayload, orjson.loads(payload))[0]
        except ValidationError as exc:
            raise Malformed(f"heartbeat invalid: {exc.errors()[0]['msg']}") from exc
        except orjson.JSONDecodeError as exc:
            raise Malformed(f"heartbeat invalid: {exc}") from exc

    def _beat(self, record: NodeRecord, beat: HeartbeatPayload) -> NodeRecord:
        node_id = record.capability.node_id
        if beat.node_id != node_id:
            raise WrongSigner("heartbeat names another node than its signer")
        now = self.clock()
        self.apply(HeartbeatSeen(node_id, at=now, seq=beat.seq, telemetry=beat.telemetry))
        row = record.telemetry_row
        self._pending_beats[node_id] = (now, row if row is not None else pack_telemetry(beat.telemetry))
        return record

    # -- failure detection ------------------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Mark nodes suspect, then down, as their heartbeats age; count nodes per state; and, after a burst of
        registrations, move what they built out of the collector's reach."""
        self.apply(Swept(self.clock()))
        for state, count in self.registry.state_counts().items():
            self.metrics.node_states.labels(state=state.value).set(count)
        self.freezer.settle()

    def mark_failed(self, node_id: NodeId, reason: str) -> None:
        """A dispatch could not reach the node: take it out of rotation until it heartbeats again."""
        self.apply(StateChanged(node_id, at=self.clock(), state=NodeState.DOWN, reason=reason))

    def can_serve(self, node_id: str) -> bool:
        """Whether the node may be given work now: live, and not ejected, quarantined or banned."""
        return self.registry.can_serve(node_id, self.clock())

    def trusted(self, node_id: str) -> bool:
        """Whether the node is known and not ejected, quarantined or banned (it may still be down)."""
        return self.registry.trusted(node_id, self.clock())

    # -- work in flight and what finished work taught ----------------------------------------------------------------
    def request_started(self, node_id: NodeId) -> bool:
        """An attempt was sent to the node (False: it is not on the grid)."""
        return self.registry.apply(RequestStarted(node_id)).applied

    def request_ended(self, node_id: NodeId) -> None:
        """An attempt on the node ended, however it ended."""
        self.registry.apply(RequestEnded(node_id))

    def observed_timing(
        self,
        node_id: NodeId,
        *,
        ttft_s: float,
        raw_predicted_ttft_s: float | None,
        fresh_ttft_s: float | None,
        raw_predicted_itl_s: float,
        itl_s: float | None,
        service: tuple[float, float] | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """A completed request's timings: the latency average, the TTFT ratio (hedge delay) and the calibration.
        `fresh_ttft_s` is the TTFT of a segment that did not resume another node's work (None otherwise);
        `service`, (uncalibrated predicted, observed) TTFT without the queue wait, calibrates where given."""
        observed = JobObserved(
            node_id,
            ttft_s,
            raw_predicted_ttft_s,
            fresh_ttft_s,
            raw_predicted_itl_s,
            itl_s,
            service,
            completion_tokens,
            at=self.clock(),
        )
        self.apply(observed)  # its calibration may settle the node's claim (an incident to write)

    def answered_for_another(self, node_id: NodeId, why: str) -> None:
        """The node's endpoint answered a probe's challenge as another identity (or as none): the identity claims
        an address that is not its own. A severe identity incident (it is quarantined), once while trusted."""
        if not self.trusted(node_id):
            return
        detail = f"identity: its endpoint answers health probes for another identity ({why})"
        self.note(
            NodeEvent(
                node_id=node_id, kind=EventKind.INCIDENT, at=self.clock(), severity=Severity.SEVERE, detail=detail
            )
        )

    def probe_result(self, node_id: NodeId, *, ok: bool, rtt_s: float, error: str = "") -> None:
        """An active /health probe answered (ok) or not."""
        self.apply(ProbeAnswered(node_id, at=self.clock(), ok=ok, rtt_s=rtt_s, error=error))

    # -- reliability --------------------------------------------------------------------------------------------------
    def note(self, event: NodeEvent) -> list[Transition]:
        """Feed the reliability ledger; persist the event (and any state change it causes)."""
        return self.apply(Noted(event)).transitions

    def quarantine(self, node_id: NodeId, reason: str) -> list[Transition]:
        """Admin action: quarantine the node (stored as an admin action: replayed as one after a restart)."""
        return self.apply(AdminAction(node_id, at=self.clock(), action="quarantine", reason=reason)).transitions

    def release(self, node_id: NodeId, reason: str) -> list[Transition]:
        """Admin action: release the node into probation (raises CannotRelease if it is banned)."""
        return self.apply(AdminAction(node_id, at=self.clock(), action="release", reason=reason)).transitions

    def flush_events(self) -> None:
        """Hand buffered ledger events and the latest heartbeat of each node to the store writer as batches
        (called by the sweeper, several times per heartbeat interval, and at exit)."""
        if self._pending_events:
            rows, self._pending_events = self._pending_events, []
            self.writer.submit(self.writer.store.record_events, rows)
        if self._pending_beats:
            beats, self._pending_beats = self._pending_beats, {}
            rolled = [  # serialised here, once per node and flush, not per heartbeat
                {"node_id": node_id, "telemetry": telemetry_json(row), "at": at} for node_id, (at, row) in beats.items()
            ]
            self.writer.submit(self.writer.store.touch_nodes, rolled)

    async def durable(self, timeout_s: float = 10.0) -> None:
        """Wait until every event noted so far is committed to the store (admin answers wait for this, so an
        acknowledged action survives a gateway crash)."""
        self.flush_events()
        await asyncio.to_thread(self.writer.flush, timeout_s)

    # -- what applying did -------------------------------------------------------------------------------------------
    def _persist(self, effects: Effects) -> None:
        for change in effects.states:
            if change.old != change.new:
                log.info("node %s: %s -> %s (%s)", change.node_id, change.old.value, change.new.value, change.reason)
            self.writer.submit(self.writer.store.set_node_state, change.node_id, change.new.value, change.at)
            self.writer.submit(
                self.writer.store.record_event,
                kind="state",
                severity="minor",
                node_id=change.node_id,
                detail={"from": change.old.value, "to": change.new.value, "reason": change.reason},
                at=change.at,
            )
        for event in effects.noted:
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
        if effects.noted or effects.admin_reason is not None:
            self._store_transitions(effects.transitions, effects.admin_reason)

    def _store_transitions(self, transitions: list[Transition], admin_reason: str | None) -> None:
        """Queued with the ledger events, not written ahead of them: the store then holds admin actions and the
        events around them in the order they happened, which is the order a restart replays them in."""
        for t in transitions:
            log.warning("node %s reliability: %s -> %s (%s)", t.node_id, t.old.value, t.new.value, t.reason)
            self._pending_events.append(
                dict(
                    kind="reliability_state",
                    severity="minor",
                    node_id=t.node_id,
                    detail={"from": t.old.value, "to": t.new.value, "reason": t.reason, "admin_reason": admin_reason},
                    at=t.at,
                )
            )

    # -- views ------------------------------------------------------------------------------------------------------
    def snapshots(self) -> TableView:
        """Every node as the scheduler sees it: the registry's table (kept as events arrive), as a view a decision
        may `append` its own candidates to (a pipeline's virtual node) without changing the table."""
        return self.registry.table.view()

    def live_models(self) -> dict[str, list[NodeRecord]]:
        models: dict[str, list[NodeRecord]] = {}
        for record in self.nodes.values():
            if record.state in LIVE:
                whole = {o.name for o in record.capability.models if o.layers is None}  # stages: pipeline/session.py
                names = whole | set(record.capability.loadable_models)
                for name in sorted(names):
                    models.setdefault(name, []).append(record)
        return models

    def describe(self, record: NodeRecord) -> dict[str, Any]:
        cap = record.capability
        telemetry = record.telemetry
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
            "telemetry": telemetry.model_dump(mode="json") if telemetry else None,
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
            "card": _card_dict(record),
        }


def _card_dict(record: NodeRecord) -> dict[str, Any] | None:
    """The card as claimed and as the gateway serves, classes and prices it (catalog/claims.py)."""
    card = record.static.card
    if card is None:
        return None

    def figures(hw: Any) -> dict[str, Any]:
        return {
            "name": hw.name,
            "class": hw.hw_class,
            "bandwidth_gbs": round(hw.bandwidth_gbs, 1),
            "fp16_tflops": round(hw.fp16_tflops, 2),
            "memory_gib": round(hw.memory_gib, 2),
        }

    return {
        "claimed": figures(card.claimed),
        "predicted": figures(card.hw),
        "priced": figures(card.priced),
        "claim": record.claim,
        "gap": round(card.gap, 3),
        "evidence": card.evidence,
    }


def _summary_dict(summary: Any) -> dict[str, Any]:
    out = {k: getattr(summary, k) for k in summary.__dataclass_fields__}
    out["state"] = summary.state.value
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
