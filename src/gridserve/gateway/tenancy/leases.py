"""Budgets that hold across gateways: each gateway spends a key's budget from a lease it takes from the store.

A key's budget is never overspent by more than what its requests in flight cost when it ran out, however many
gateways serve it. Each gateway admits a request on a budget only while its own spend is below its lease, and the
store grants leases in a transaction that locks the key's row, so the live gateways' leases never add up to more
than the budget (store/keys.py `KeyStore.lease`). A gateway asks for a slice (`LEASE_SHARE` of the budget) when its
room runs low, before the request that needs it is decided: a round trip to the store on one request in several,
none on the others. A key idle here for `IDLE_S` gives its unspent lease back, and a gateway that stops gives back
all it holds. One that crashed holds its lease (at most a slice) until it runs again under its id: what it spent
after it last wrote is unknown, and the budget is never overspent. A gateway that cannot reach the store spends on
from the lease it holds (the store counts it as this gateway's) and is refused once it needs more.

The store hears of a lease only when it changes: a grant (in its own transaction), and a give-back (idle or at a
stop), written with the next key sync and again with each one after until the store has it.
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
IDLE_S = 10.0
"""A key with no request admitted here for this long gives its unspent lease back."""


class BudgetLeases:
    """This gateway's leases on keys' budgets: the one writer of `KeyCounts.lease_usd`."""

    def __init__(
        self, keystore: KeyStore, limiter: Limiter, *, gateway_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.keystore, self.limiter, self.gateway_id, self.clock = keystore, limiter, gateway_id, clock
        self.writing = asyncio.Lock()
        """Held around every lease write (a grant, a give-back): a give-back built before a grant must not land
        after it and lower the lease the store holds."""
        self.unwritten: set[str] = set()
        """Keys whose lease was given back here and not yet written to the store."""

    async def reserve(self, key: ApiKey) -> None:
        """Make sure this gateway holds room on `key`'s budget for one more request, if the budget has any: a lease
        topped up from the store when it runs low (no store call otherwise). A store that cannot be reached leaves
        the lease as it is (the request is refused once it is spent)."""
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
            want = spent + LEASE_SHARE * budget
            try:
                granted = await asyncio.to_thread(
                    self.keystore.lease,
                    key.key_id,
                    self.gateway_id,
                    spent_usd=spent,
                    want_usd=want,
                    budget_usd=budget,
                    now=self.clock(),
                )
            except Exception:  # the store is down: spend on from what is held
                return
            counts.lease_usd = granted
            self.unwritten.discard(key.key_id)  # the grant wrote the row as it stands

    @staticmethod
    def _roomy(counts: KeyCounts, budget: float) -> bool:
        if counts.lease_usd is None:
            return False
        return counts.lease_usd - counts.own.spent_usd > LOW_WATER * LEASE_SHARE * budget

    async def give_back_idle(self) -> None:
        """Give back the unspent lease of each key with nothing admitted here for IDLE_S and nothing in flight (with
        each key sync), and write what the store does not have yet."""
        async with self.writing:
            now = self.clock()
            for key_id, counts in self.limiter.keys.items():
                if now - counts.last_admit >= IDLE_S and counts.own.inflight <= 0:
                    self._lower(key_id, counts)
            await self._write(now)

    async def give_back(self) -> None:
        """Lower every lease to what was spent (the gateway is stopping): the others may spend the rest."""
        async with self.writing:
            for key_id, counts in self.limiter.keys.items():
                self._lower(key_id, counts)
            await self._write(self.clock())

    def _lower(self, key_id: str, counts: KeyCounts) -> None:
        if counts.lease_usd is not None and counts.lease_usd > counts.own.spent_usd:
            counts.lease_usd = counts.own.spent_usd
            self.unwritten.add(key_id)

    async def _write(self, now: float) -> None:
        """The given-back leases, as they stand now (a failed write is tried again with the next sync)."""
        rows = [
            {
                "key_id": key_id,
                "gateway_id": self.gateway_id,
                "leased_usd": counts.lease_usd,
                "spent_usd": counts.own.spent_usd,
                "updated_at": now,
            }
            for key_id in sorted(self.unwritten)
            if (counts := self.limiter.keys.get(key_id)) is not None and counts.lease_usd is not None
        ]
        if rows:
            await asyncio.to_thread(self.keystore.put_leases, rows)
        self.unwritten.clear()
