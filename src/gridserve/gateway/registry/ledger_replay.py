"""Rebuild the reliability book from the ledger in the store when a gateway starts, so that a quarantine or a
ban (and every node's record) survives a restart: a node cannot shed an incident by waiting for one.

Stored rows become the same registry events live traffic and other gateways' rows do (`Noted`, `AdminAction`,
marked `stored`: not written again), applied by the same `apply`."""

import logging
from typing import Any, Protocol

from pydantic import ValidationError

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.registry.events import AdminAction, Event, Noted
from gridserve.gateway.registry.registry import Effects, NodeRegistry
from gridserve.gateway.registry.whitewash import Marks, signals_of
from gridserve.reliability import EXCLUDED, EventKind, NodeEvent, ReliabilityBook, ReliabilityError, Severity
from gridserve.store import Store
from gridserve.types import Capability, NodeId
from gridserve.types.base import lenient

log = logging.getLogger("gridserve.gateway")
STATE = "reliability_state"


class Applies(Protocol):
    """A registry, or the membership in front of it."""

    def apply(self, event: Event) -> Effects: ...


def stored_event(row: dict[str, Any]) -> NodeEvent:
    """The ledger event a stored `node_events` row records."""
    detail = row.get("detail") or {}
    return NodeEvent(
        node_id=str(row["node_id"]),
        kind=EventKind(row["kind"]),
        at=float(row["at"]),
        severity=Severity(row.get("severity") or "minor"),
        within_slo=detail.get("within_slo"),
        detail=str(detail.get("detail", "")),
    )


def admin_event(row: dict[str, Any]) -> AdminAction | None:
    """The admin quarantine or release a stored reliability-state row records; None if it records none (other
    state changes follow from the events themselves)."""
    detail = row.get("detail") or {}
    reason = detail.get("admin_reason")
    if reason is None:
        return None
    node_id, at = NodeId(str(row["node_id"])), float(row["at"])
    if detail.get("to") == "quarantined":
        return AdminAction(node_id, at=at, action="quarantine", reason=str(reason), stored=True)
    if detail.get("to") == "probation":
        return AdminAction(node_id, at=at, action="release", reason=str(reason), stored=True)
    return None


def row_event(row: dict[str, Any]) -> Event | None:
    """The registry event a stored ledger row records (None: a state row that records no admin action)."""
    if row["kind"] == STATE:
        return admin_event(row)
    return Noted(stored_event(row), stored=True)


def replay(store: Store, target: Applies | ReliabilityBook) -> int:
    """Apply the stored events (oldest first) to `target` (a registry or the membership; a bare book is given a
    registry of its own); returns how many were applied."""
    applier = NodeRegistry(GatewayConfig(), target) if isinstance(target, ReliabilityBook) else target
    kinds = [k.value for k in EventKind if k != EventKind.HEARTBEAT_KEPT] + [STATE]
    applied = 0
    for row in store.events_in_order(kinds):
        if row.get("node_id") is None:
            continue
        try:
            event = row_event(row)
            if event is not None:
                applier.apply(event)
            applied += 1
        except (ReliabilityError, ValueError) as exc:
            log.warning("ledger replay skipped an event: %s", exc)
    return applied


def restore_marks(store: Store, book: ReliabilityBook, marks: Marks, now: float) -> int:
    """After the replay, the whitewashing marks (gateway/registry/whitewash.py) as they were: where each stored node
    last registered from (its capability document and source address) is remembered again, and every identity the
    book holds quarantined or banned marks it from the time it fell, so a fresh key from the same place still
    starts further back after a restart. Returns how many identities' marks were restored."""
    restored = 0
    for row in reversed(store.node_origins(marks.keep)):  # oldest first: the newest are kept if `keep` is passed
        try:
            capability = lenient(Capability, row["capability"])[0]
        except ValidationError as exc:
            log.warning("whitewash marks: the stored capability of %s does not load: %s", row["node_id"], exc)
            continue
        node_id = str(row["node_id"])
        marks.registered(node_id, signals_of(capability, row["address"] or "?"))
        if book.knows(node_id) and book.state(node_id, now) in EXCLUDED:
            fell = next((t.at for t in book.transitions(node_id) if t.new in EXCLUDED), now)
            marks.fell(node_id, fell)
            restored += 1
    return restored
