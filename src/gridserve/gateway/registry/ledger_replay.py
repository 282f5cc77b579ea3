"""Rebuild the reliability book from the ledger in the store when a gateway starts, so that a quarantine or a
ban (and every node's record) survives a restart: a node cannot shed an incident by waiting for one."""

import contextlib
import logging
from typing import Any

from gridserve.reliability import CannotRelease, EventKind, NodeEvent, ReliabilityBook, ReliabilityError, Severity
from gridserve.store import Store

log = logging.getLogger("gridserve.gateway")
STATE = "reliability_state"


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


def admin_action(book: ReliabilityBook, row: dict[str, Any]) -> bool:
    """Apply a stored admin quarantine or release to `book`; False if the row records no admin action."""
    detail = row.get("detail") or {}
    reason = detail.get("admin_reason")
    if reason is None:
        return False  # other state changes follow from the events themselves
    node_id, at = str(row["node_id"]), float(row["at"])
    if detail.get("to") == "quarantined":
        book.quarantine(node_id, reason=str(reason), now=at)
        return True
    if detail.get("to") == "probation":
        with contextlib.suppress(CannotRelease):  # a ban that came later in the ledger wins
            book.release(node_id, reason=str(reason), now=at)
        return True
    return False


def replay(store: Store, book: ReliabilityBook) -> int:
    """Feed the stored events (oldest first) into `book`; returns how many were applied."""
    kinds = [k.value for k in EventKind if k != EventKind.HEARTBEAT_KEPT] + [STATE]
    applied = 0
    for row in store.events_in_order(kinds):
        if row.get("node_id") is None:
            continue
        try:
            if row["kind"] == STATE:
                admin_action(book, row)
            else:
                book.record(stored_event(row))
            applied += 1
        except (ReliabilityError, ValueError) as exc:
            log.warning("ledger replay skipped an event: %s", exc)
    return applied
