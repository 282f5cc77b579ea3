"""Several gateways on one PostgreSQL database: each keeps its own in-memory view (the scheduler never reads the
database) and brings it up to date from what the others wrote.

- **Nodes**: a node registers and heartbeats with one gateway, which writes its capability and rolled-up telemetry
  to the `nodes` table; the others read the rows that moved (`last_seen` later than their cursor, written by
  another gateway), adopt nodes they do not know and take their telemetry and heartbeat time. Each gateway still
  probes every node itself and judges its liveness on its own.
- **Reliability**: every event a gateway records (job outcomes, incidents, admin quarantines and releases) is
  stored with the gateway's id as `origin`; the others apply the events of other origins to their own books, so a
  severe incident or an admin action taken on one gateway is in force on all. Liveness observations (missed
  heartbeats, node state changes) stay local: each gateway makes its own.
- **Promptness**: a commit of events is announced with `NOTIFY gridserve_events`; a listener thread wakes the sync
  at once (a quarantine is in force on the other gateways within milliseconds), and the sync also runs every
  `cluster_sync_interval_s` whatever happens.

Event ids come from a sequence, and transactions commit out of id order: the tail keeps a low-water mark and a
set of ids seen above it, and gives up on a gap (a rolled-back insert) after `GAP_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gridserve.gateway.registry.events import Noted
from gridserve.gateway.registry.ledger_replay import STATE, admin_event, stored_event
from gridserve.gateway.registry.membership import Membership
from gridserve.reliability import EventKind, ReliabilityError
from gridserve.store import Store
from gridserve.store.db import NOTIFY_CHANNEL
from gridserve.types import Capability, Telemetry
from gridserve.types.base import lenient

log = logging.getLogger("gridserve.gateway")

GAP_TIMEOUT_S = 5.0
"""An event id missing below ids already seen is waited for this long (its transaction may commit late)."""
NODE_CURSOR_SLACK_S = 2.0
"""Rows are re-read this far behind the newest `last_seen` seen (other gateways' clocks and commit delays)."""
ADOPT_HORIZON_S = 600.0
"""At start, nodes heard from in this many seconds are adopted (older rows are long-gone nodes)."""
LOCAL_KINDS = frozenset({EventKind.HEARTBEAT_MISSED.value, EventKind.HEARTBEAT_KEPT.value})
"""Observations each gateway makes for itself: never taken from another gateway."""
LEDGER_KINDS = frozenset(k.value for k in EventKind)


@dataclass
class EventTail:
    """Which event ids have been read: everything <= `low`, and `seen` above it."""

    low: int
    seen: set[int] = field(default_factory=set)
    gaps: dict[int, float] = field(default_factory=dict)
    """Missing id -> when it was first noticed missing."""

    def fresh(self, ids: Iterable[int]) -> list[int]:
        """Mark ids read; return those not read before."""
        new = [i for i in ids if i > self.low and i not in self.seen]
        self.seen.update(new)
        return new

    def advance(self, now: float) -> None:
        """Move `low` up past every id read and every gap older than GAP_TIMEOUT_S."""
        if not self.seen:
            return
        top = max(self.seen)
        for missing in range(self.low + 1, top):
            if missing not in self.seen:
                self.gaps.setdefault(missing, now)
        while self.low < top:
            nxt = self.low + 1
            if nxt in self.seen:
                self.seen.discard(nxt)
            elif now - self.gaps.get(nxt, now) >= GAP_TIMEOUT_S:
                self.gaps.pop(nxt, None)
            else:
                break
            self.gaps.pop(nxt, None)
            self.low = nxt


@dataclass
class SyncStats:
    syncs: int = 0
    events_applied: int = 0
    nodes_adopted: int = 0
    nodes_updated: int = 0
    notifications: int = 0
    last_sync_at: float = 0.0
    last_error: str = ""
    peers: dict[str, float] = field(default_factory=dict)
    """Other gateways' ids -> when their writes were last seen."""
    lags_s: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    """Recent replication lags: when another gateway's event was applied here, minus its time there."""


class ClusterSync:
    """Keeps one gateway's membership and reliability book in step with the other gateways on its database."""

    def __init__(
        self,
        membership: Membership,
        store: Store,
        *,
        gateway_id: str,
        interval_s: float,
        event_cursor: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.membership = membership
        self.store = store
        self.gateway_id = gateway_id
        self.interval_s = interval_s
        self.clock = clock
        self.tail = EventTail(low=event_cursor)
        self.node_cursor = clock() - ADOPT_HORIZON_S + NODE_CURSOR_SLACK_S
        self.stats = SyncStats()
        self._wake = asyncio.Event()
        self._stop = threading.Event()

    # -- the loop ----------------------------------------------------------------------------------------------
    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        listener = threading.Thread(target=self._listen, args=(loop,), name="gridserve-cluster-listen", daemon=True)
        if self.store.dialect == "postgresql":
            listener.start()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
                self._wake.clear()
                try:
                    await self.sync_once()
                except Exception as exc:  # the database may be restarting: keep serving from memory
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("cluster sync failed: %s", self.stats.last_error)
        finally:
            self._stop.set()

    async def sync_once(self) -> None:
        rows = await asyncio.to_thread(self.store.events_after, self.tail.low, exclude_origin=None)
        self.apply_events(rows)
        since = max(0.0, self.node_cursor - NODE_CURSOR_SLACK_S)
        seen = await asyncio.to_thread(self.store.nodes_seen_since, since)
        others = [r for r in seen if r.get("gateway") != self.gateway_id]
        stale = [r["node_id"] for r in others if self._needs_capability(r)]
        caps = await asyncio.to_thread(self.store.capabilities, stale) if stale else {}
        self.apply_nodes(others, caps)
        if seen:
            self.node_cursor = max(self.node_cursor, max(float(r["last_seen"]) for r in seen))
        self.stats.syncs += 1
        self.stats.last_sync_at = self.clock()

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """LISTEN on the notification channel (own connection, outside the pool); wake the sync on each notice."""
        while not self._stop.is_set():
            raw: Any = None
            try:
                raw = self.store.engine.raw_connection()
                conn: Any = raw.driver_connection
                raw.detach()
                conn.rollback()  # the pool's liveness ping may have opened a transaction
                conn.autocommit = True
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                while not self._stop.is_set():
                    for notice in conn.notifies(timeout=1.0):
                        if notice.payload != self.gateway_id:
                            self.stats.notifications += 1
                            self._fetch_now(loop)
            except Exception as exc:
                log.warning("cluster listener: %s; reconnecting in 1 s", exc)
                self._stop.wait(1.0)
            finally:
                if raw is not None:
                    with contextlib.suppress(Exception):
                        raw.close()

    def _fetch_now(self, loop: asyncio.AbstractEventLoop) -> None:
        """On a notice: read the new events here, in the listener thread, and hand them to the event loop (one
        hop fewer than waking the sync; the tail drops whatever the sync has read meanwhile)."""
        try:
            rows = self.store.events_after(self.tail.low, exclude_origin=None)
        except Exception:
            loop.call_soon_threadsafe(self._wake.set)  # the regular sync will try
            return
        loop.call_soon_threadsafe(self.apply_events, rows)

    # -- applying what others wrote -------------------------------------------------------------------------------
    def apply_events(self, rows: list[dict[str, Any]]) -> None:
        by_id = {int(r["id"]): r for r in rows}
        for event_id in self.tail.fresh(sorted(by_id)):
            row = by_id[event_id]
            origin = row.get("origin")
            if origin == self.gateway_id or row.get("node_id") is None or row["kind"] in LOCAL_KINDS:
                continue
            if origin:
                self.stats.peers[str(origin)] = self.clock()
            try:
                self._apply_event(row)
                self.stats.lags_s.append(max(0.0, self.clock() - float(row["at"])))
            except (ReliabilityError, ValueError) as exc:
                log.warning("cluster sync skipped event %s: %s", event_id, exc)
        self.tail.advance(self.clock())

    def _apply_event(self, row: dict[str, Any]) -> None:
        """Another gateway's stored event, applied as the registry event it records (as at a restart's replay)."""
        if row["kind"] == STATE:
            admin = admin_event(row)
            if admin is not None:
                self.membership.apply(admin)
                self.stats.events_applied += 1
            return
        if row["kind"] not in LEDGER_KINDS:
            return  # the gateway's own records (state, protocol_rejected): not ledger entries
        transitions = self.membership.apply(Noted(stored_event(row), stored=True)).transitions
        self.stats.events_applied += 1
        for t in transitions:
            log.warning("node %s reliability (from gateway %s): %s -> %s", t.node_id, row.get("origin"), t.old, t.new)

    def _needs_capability(self, row: dict[str, Any]) -> bool:
        record = self.membership.nodes.get(row["node_id"])
        return record is None or float(row.get("capability_at") or 0.0) > record.capability_at

    def apply_nodes(self, rows: list[dict[str, Any]], caps: dict[str, dict[str, Any]]) -> None:
        for row in rows:
            node_id = row["node_id"]
            if node_id in caps:
                self._adopt(caps[node_id], row)
            record = self.membership.nodes.get(node_id)
            if record is None:
                continue
            if row.get("gateway"):
                self.stats.peers[str(row["gateway"])] = self.clock()
            telemetry = _telemetry(row.get("telemetry"))
            if self.membership.heard_elsewhere(record, last_seen=float(row["last_seen"]), telemetry=telemetry):
                self.stats.nodes_updated += 1

    def _adopt(self, stored: dict[str, Any], row: dict[str, Any]) -> None:
        try:
            capability = lenient(Capability, stored["capability"])[0]  # a newer gateway's nodes too
        except ValidationError as exc:
            log.warning("cluster sync: stored capability of %s is invalid: %s", row["node_id"], exc.errors()[0])
            return
        self.membership.adopt(
            capability,
            registered_at=float(stored.get("registered_at") or row["last_seen"]),
            capability_at=float(stored.get("capability_at") or 0.0),
            last_seen=float(row["last_seen"]),
            via=str(row.get("gateway") or "?"),
        )
        self.stats.nodes_adopted += 1

    def status(self) -> dict[str, Any]:
        now = self.clock()
        s = self.stats
        return {
            "gateway_id": self.gateway_id,
            "backend": self.store.dialect,
            "sync_interval_s": self.interval_s,
            "syncs": s.syncs,
            "last_sync_age_s": round(now - s.last_sync_at, 3) if s.last_sync_at else None,
            "events_applied": s.events_applied,
            "nodes_adopted": s.nodes_adopted,
            "node_updates": s.nodes_updated,
            "notifications": s.notifications,
            "event_cursor": self.tail.low,
            "replication_lag_ms": _lag_summary(list(s.lags_s)),
            "peers": {p: round(now - at, 3) for p, at in sorted(s.peers.items())},
            "last_error": s.last_error or None,
        }


def _lag_summary(lags: list[float]) -> dict[str, float] | None:
    """p50 / p99 / max of recent replication lags, in ms (None before any event from another gateway)."""
    if not lags:
        return None
    ordered = sorted(lags)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 1)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1] * 1e3, 1), "events": len(ordered)}


def _telemetry(value: Any) -> Telemetry | None:
    if value is None:
        return None
    try:
        return lenient(Telemetry, value)[0]
    except ValidationError:
        return None


__all__ = ["ClusterSync", "EventTail"]
