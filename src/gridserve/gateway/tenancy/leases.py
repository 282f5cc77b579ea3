"""Budgets that hold across gateways: each gateway spends a key's budget from a lease it takes from the store.

A key's budget is never overspent by more than what its requests in flight cost when it ran out, however many
gateways serve it. Each gateway admits a request on a budget only while its own spend is below its lease, and the
store grants leases in a transaction that locks the key's row, so the live gateways' leases never add up to more
than the budget (store/keys.py `KeyStore.lease`). A gateway asks for a slice (`LEASE_SHARE` of the budget) when its
room runs low, before the request that needs it is decided: a round trip to the store on one request in several,
none on the others. A key idle here for `IDLE_S` gives its unspent lease back, and a gateway that stops gives back
all it holds. One that crashed holds its lease (at most a slice) until it runs again under its id: what it spent
after it last wrote is unknown, and the budget is never overspent. A gateway spends from its lease only while the
store renews it (`LEASE_TTL_S`, with each key sync): one that cannot reach the store stops when its lease lapses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gridserve.gateway.tenancy.keys import ApiKey
from gridserve.gateway.tenancy.limits import KeyCounts, Limiter
from gridserve.store import KeyStore

LEASE_SHARE = 0.1
"""A lease grows by this share of the budget at a time: at most this much per gateway is held but unspent."""
LOW_WATER = 0.5
"""A lease is topped up when less than this share of a slice is left of it."""
LEASE_TTL_S = 2.5
"""A lease lapses here this long after the store last renewed it (the others reclaim it after LIVE_S, later)."""
IDLE_S = 10.0
"""A key with no request admitted here for this long gives its unspent lease back."""


class BudgetLeases:
    """This gateway's leases on keys' budgets: the one writer of `KeyCounts.lease_usd` and `lease_until`."""

    def __init__(
        self, keystore: KeyStore, limiter: Limiter, *, gateway_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.keystore, self.limiter, self.gateway_id, self.clock = keystore, limiter, gateway_id, clock
        self.writing = asyncio.Lock()
        """Held around every lease write (a grant, a sync's renewal): a renewal built before a grant must not land
        after it and lower the lease the store holds."""

    async def reserve(self, key: ApiKey) -> None:
        """Make sure this gateway holds room on `key`'s budget for one more request, if the budget has any: a lease
        topped up from the store when it runs low or lapses (no store call otherwise). A store that cannot be
        reached leaves the lease as it is (the request is refused once it lapses)."""
        budget = key.policy.budget_usd
        if key.static or budget is None:
            return
        counts = self.limiter.counts(key.key_id)
        if self._roomy(counts, budget):
            return
        async with self.writing:
            if self._roomy(counts, budget):
                return
            spent = counts.own.spent_usd
            now = self.clock()
            want = spent + LEASE_SHARE * budget
            try:
                granted = await asyncio.to_thread(
                    self.keystore.lease,
                    key.key_id,
                    self.gateway_id,
                    spent_usd=spent,
                    want_usd=want,
                    budget_usd=budget,
                    now=now,
                )
            except Exception:  # the store is down: spend on from what is held, until it lapses
                return
            counts.lease_usd, counts.lease_until = granted, now + LEASE_TTL_S

    def _roomy(self, counts: KeyCounts, budget: float) -> bool:
        now = self.clock()
        if counts.lease_usd is None or now >= counts.lease_until - LEASE_TTL_S / 2:
            return False
        return counts.lease_usd - counts.own.spent_usd > LOW_WATER * LEASE_SHARE * budget

    def renewals(self, now: float) -> list[dict[str, object]]:
        """This gateway's leases as they stand, to write with a key sync (an idle key's lowered to its spend)."""
        rows: list[dict[str, object]] = []
        for key_id, counts in self.limiter.keys.items():
            if counts.lease_usd is None:
                continue
            if now - counts.last_admit >= IDLE_S and counts.own.inflight <= 0:
                counts.lease_usd = min(counts.lease_usd, counts.own.spent_usd)
            rows.append(
                {
                    "key_id": key_id,
                    "gateway_id": self.gateway_id,
                    "leased_usd": counts.lease_usd,
                    "spent_usd": counts.own.spent_usd,
                    "updated_at": now,
                }
            )
        return rows

    async def renew(self) -> None:
        """Write this gateway's leases as they stand (with each key sync): they hold for another LEASE_TTL_S."""
        async with self.writing:
            now = self.clock()
            rows = self.renewals(now)
            if rows:
                await asyncio.to_thread(self.keystore.put_leases, rows)
                self.renewed(rows, now)

    async def give_back(self) -> None:
        """Lower every lease to what was spent (the gateway is stopping): the others may spend the rest."""
        async with self.writing:
            for counts in self.limiter.keys.values():
                if counts.lease_usd is not None:
                    counts.lease_usd = min(counts.lease_usd, counts.own.spent_usd)
            rows = self.renewals(self.clock())
            if rows:
                await asyncio.to_thread(self.keystore.put_leases, rows)

    def renewed(self, rows: list[dict[str, object]], at: float) -> None:
        """The store has these leases as of `at`: they hold for another LEASE_TTL_S."""
        for row in rows:
            counts = self.limiter.keys.get(str(row["key_id"]))
            if counts is not None and counts.lease_usd is not None:
                counts.lease_until = max(counts.lease_until, at + LEASE_TTL_S)
