"""API keys and their usage counters in the store (gateway/tenancy/).

- `api_keys`: one row a key: its digest (never the key), limits, allowed models and tiers, priority class, and
  `updated_at`, which moves on every change (creation, revocation) so each gateway reads only the rows that moved.
- `key_usage`: what each gateway counted for each key. A row per (key, gateway, window): `window_start` is the
  minute's start (unix seconds) for requests and tokens, and 0 for the running totals (spend, errors, requests in
  flight). Every gateway writes only its own rows, with absolute values (a retried write counts nothing twice), and
  reads the others' sums: limits hold across gateways with no database round trip on a request's path.
- `key_leases`: each gateway's lease on a key's budget (gateway/tenancy/leases.py): the spend it may reach, and its
  own spend when it last wrote; a row is written only when its lease changes (a grant, a give-back). Leases are
  granted in a transaction that locks the key's row, so the gateways' leases never add up to more than the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from gridserve.store.db import Store, metadata, upsert_template

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(), primary_key=True),
    sa.Column("name", sa.String(), nullable=False),
    sa.Column("digest", sa.String(), nullable=False),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.Column("updated_at", sa.Float(), nullable=False),
    sa.Column("revoked_at", sa.Float(), nullable=True),
    # limits, allowed models and tiers, priority class: gateway/tenancy/keys.py KeyPolicy
    sa.Column("policy", sa.JSON(), nullable=False),
    sa.Index("ix_api_keys_updated_at", "updated_at"),
)

key_usage = sa.Table(
    "key_usage",
    metadata,
    sa.Column("key_id", sa.String(), primary_key=True),
    sa.Column("gateway_id", sa.String(), primary_key=True),
    sa.Column("window_start", sa.Float(), primary_key=True),
    sa.Column("requests", sa.Integer(), nullable=False),
    sa.Column("tokens", sa.Integer(), nullable=False),
    sa.Column("spent_usd", sa.Float(), nullable=False),
    sa.Column("errors", sa.Integer(), nullable=False),
    sa.Column("inflight", sa.Integer(), nullable=False),
    sa.Column("updated_at", sa.Float(), nullable=False),
)
USAGE_COUNTS = ["requests", "tokens", "spent_usd", "errors", "inflight", "updated_at"]

key_leases = sa.Table(
    "key_leases",
    metadata,
    sa.Column("key_id", sa.String(), primary_key=True),
    sa.Column("gateway_id", sa.String(), primary_key=True),
    sa.Column("leased_usd", sa.Float(), nullable=False),
    sa.Column("spent_usd", sa.Float(), nullable=False),
    sa.Column("updated_at", sa.Float(), nullable=False),
)
LEASE_VALUES = ["leased_usd", "spent_usd", "updated_at"]


class KeyStore:
    """The store's side of API keys: rows in, rows out; every decision is the caller's."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._upsert = upsert_template(store.dialect, key_usage, USAGE_COUNTS)
        self._upsert_lease = upsert_template(store.dialect, key_leases, LEASE_VALUES)

    def insert_key(self, row: dict[str, Any]) -> None:
        with self.store.transaction() as conn:
            conn.execute(api_keys.insert().values(row))

    def keys_changed_since(self, since: float) -> list[dict[str, Any]]:
        """Every key whose row moved at or after `since` (all of them from 0), oldest change first."""
        stmt = sa.select(api_keys).where(api_keys.c.updated_at >= since).order_by(api_keys.c.updated_at)
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def revoke_key(self, key_id: str, at: float) -> dict[str, Any] | None:
        """Mark a key revoked (the first revocation's time stays); the row after, or None if there is no such key."""
        with self.store.transaction() as conn:
            found = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id).with_for_update()).first()
            if found is None:
                return None
            row = dict(found._mapping)
            if row["revoked_at"] is None:
                row.update(revoked_at=at, updated_at=at)
                values = {"revoked_at": at, "updated_at": at}
                conn.execute(api_keys.update().where(api_keys.c.key_id == key_id).values(values))
            return row

    def rotate_key(self, key_id: str, new_digest: str, at: float) -> dict[str, Any] | None:
        """Give an active key a new digest (its id, policy and counts stay); the row after, or None if there is no
        such key or it was revoked."""
        with self.store.transaction() as conn:
            found = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id).with_for_update()).first()
            if found is None or found.revoked_at is not None:
                return None
            values = {"digest": new_digest, "updated_at": at}
            conn.execute(api_keys.update().where(api_keys.c.key_id == key_id).values(values))
            return {**dict(found._mapping), **values}

    def put_usage(self, rows: Sequence[dict[str, Any]]) -> None:
        """This gateway's counters (absolute values), one transaction."""
        if rows:
            with self.store.transaction() as conn:
                conn.execute(self._upsert, list(rows))

    def usage_sums(self, windows: Sequence[float], *, exclude_gateway: str, live_since: float) -> list[dict[str, Any]]:
        """The other gateways' counters summed per (key, window) over `windows`; `inflight` only from rows written
        at or after `live_since` (a gateway that stopped holds nothing in flight)."""
        u = key_usage.c
        live = sa.case((u.updated_at >= live_since, u.inflight), else_=0)
        stmt = (
            sa.select(
                u.key_id,
                u.window_start,
                sa.func.sum(u.requests).label("requests"),
                sa.func.sum(u.tokens).label("tokens"),
                sa.func.sum(u.spent_usd).label("spent_usd"),
                sa.func.sum(u.errors).label("errors"),
                sa.func.sum(live).label("inflight"),
            )
            .where(u.window_start.in_(list(windows)), u.gateway_id != exclude_gateway)
            .group_by(u.key_id, u.window_start)
        )
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def own_usage(self, gateway_id: str, windows: Sequence[float]) -> list[dict[str, Any]]:
        """This gateway's own rows (read back at start: a restarted gateway continues its counts)."""
        u = key_usage.c
        stmt = sa.select(key_usage).where(u.gateway_id == gateway_id, u.window_start.in_(list(windows)))
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def prune_usage(self, before: float) -> int:
        """Drop minute rows older than `before` (the running totals, window 0, stay)."""
        u = key_usage.c
        with self.store.transaction() as conn:
            return int(conn.execute(key_usage.delete().where(u.window_start > 0, u.window_start < before)).rowcount)

    def lease(
        self,
        key_id: str,
        gateway_id: str,
        *,
        spent_usd: float,
        want_usd: float,
        budget_usd: float,
        now: float,
    ) -> float:
        """Raise `gateway_id`'s lease on the key's budget toward `want_usd` (the spend it may reach), within what the
        other gateways have committed: each the larger of its lease and its spend. Returns the lease granted (never
        below `spent_usd`)."""
        with self.store.transaction() as conn:
            conn.execute(sa.select(api_keys.c.key_id).where(api_keys.c.key_id == key_id).with_for_update())
            committed = self._committed(conn, key_id, gateway_id)
            granted = max(spent_usd, min(want_usd, budget_usd - committed))
            row = {"key_id": key_id, "gateway_id": gateway_id, "leased_usd": granted, "spent_usd": spent_usd}
            conn.execute(self._upsert_lease, [{**row, "updated_at": now}])
            return granted

    @staticmethod
    def _committed(conn: sa.Connection, key_id: str, gateway_id: str) -> float:
        """The budget the other gateways hold: each one's lease, or its spend (its lease row's or its counters') where
        that is larger. A gateway that stopped without giving its lease back holds it until it runs again under its
        id: what it spent after it last wrote is not known, and a budget is never overspent."""
        held: dict[str, float] = {}
        u = key_usage.c
        totals = sa.select(u.gateway_id, u.spent_usd).where(
            u.key_id == key_id, u.window_start == 0.0, u.gateway_id != gateway_id
        )
        for gateway, spent in conn.execute(totals):
            held[gateway] = float(spent)
        lease = key_leases.c
        leases = sa.select(key_leases).where(lease.key_id == key_id, lease.gateway_id != gateway_id)
        for row in conn.execute(leases):
            held[row.gateway_id] = max(held.get(row.gateway_id, 0.0), float(row.spent_usd), float(row.leased_usd))
        return sum(held.values())

    def put_leases(self, rows: Sequence[dict[str, Any]]) -> None:
        """Leases this gateway gave back (each lowered to its spend): the others may be granted the rest."""
        if rows:
            with self.store.transaction() as conn:
                conn.execute(self._upsert_lease, list(rows))
