"""Rebuild the reliability book from the ledger in the store when a gateway starts, so that a quarantine or a
ban (and every node's record) survives a restart: a node cannot shed an incident by waiting for one."""

import contextlib
import logging
from typing import Any

from gridserve.reliability import CannotRelease, EventKind, NodeEvent, ReliabilityBook, ReliabilityError, Severity
from gridserve.store import Store

log = logging.getLogger("gridserve.gateway")
STATE = "reliability_state"


def _event(row: dict[str, Any]) -> NodeEvent:
    detail = row.get("detail") or {}
    return NodeEvent(
        node_id=str(row["node_id"]),
        kind=EventKind(row["kind"]),
        at=float(row["at"]),
        severity=Severity(row.get("severity") or "minor"),
        within_slo=detail.get("within_slo"),
        detail=str(detail.get("detail", "")),
    )


def _admin_action(book: ReliabilityBook, row: dict[str, Any]) -> None:
    detail = row.get("detail") or {}
    reason = detail.get("admin_reason")
    if reason is None:
        return  # other state changes follow from the events themselves
    node_id, at = str(row["node_id"]), float(row["at"])
    if detail.get("to") == "quarantined":
        book.quarantine(node_id, reason=str(reason), now=at)
    elif detail.get("to") == "probation":
        with contextlib.suppress(CannotRelease):  # a ban that came later in the ledger wins
            book.release(node_id, reason=str(reason), now=at)


def replay(store: Store, book: ReliabilityBook) -> int:
    """Feed the stored events (oldest first) into `book`; returns how many were applied."""
    kinds = [k.value for k in EventKind if k != EventKind.HEARTBEAT_KEPT] + [STATE]
    applied = 0
    for row in store.events_in_order(kinds):
        if row.get("node_id") is None:
            continue
        try:
            if row["kind"] == STATE:
                _admin_action(book, row)
            else:
                book.record(_event(row))
            applied += 1
        except (ReliabilityError, ValueError) as exc:
            log.warning("ledger replay skipped an event: %s", exc)
    return applied
