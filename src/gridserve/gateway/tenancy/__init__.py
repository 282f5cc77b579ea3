"""Tenancy: API keys with limits, budgets, allowed models and tiers, and usage per key (issue 20).

- keys.py: a key and its policy; book.py: which keys this gateway accepts; limits.py: admission against limits;
  sync.py: the store keeps the gateways of one database in step; usage.py: what each key used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gridserve.catalog.tiers import DEFAULT_TIER
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.tenancy.book import KeyBook
from gridserve.gateway.tenancy.keys import ApiKey, KeyPolicy, from_row, new_key, view
from gridserve.gateway.tenancy.keys import digest as key_digest
from gridserve.gateway.tenancy.leases import BudgetLeases
from gridserve.gateway.tenancy.limits import Admission, Limiter, OverLimit
from gridserve.gateway.tenancy.queue import FairQueue
from gridserve.gateway.tenancy.sync import TenancySync
from gridserve.gateway.tenancy.usage import Usage
from gridserve.store import KeyStore, Store

MAX_NAME_CHARS = 200


class UnknownKey(LookupError):
    """No issued key with this id."""


class Tenancy:
    """Keys, their limits and their usage on this gateway (the one owner of each)."""

    def __init__(
        self,
        store: Store,
        static_keys: Iterable[str],
        *,
        gateway_id: str,
        sync_interval_s: float,
        capacity: Callable[[str], int] = lambda model: 0,
        elsewhere: Callable[[str], int] = lambda model: 0,
        queue_shares: Mapping[str, float] | None = None,
        queue_deadlines_s: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.queue = FairQueue(capacity, elsewhere=elsewhere, shares=queue_shares, deadlines_s=queue_deadlines_s)
        """Requests waiting for room when every node serving their model is saturated (each class's share of the
        slots and deadline: the queue's defaults for the classes `queue_shares`, `queue_deadlines_s` do not name)."""
        self.book = KeyBook(static_keys)
        self.limiter = Limiter(clock, leases=True)
        self.usage = Usage()
        self.keystore = KeyStore(store)
        self.sync = TenancySync(
            self.keystore, self.book, self.limiter, gateway_id=gateway_id, interval_s=sync_interval_s, clock=clock
        )
        self.leases = BudgetLeases(self.keystore, self.limiter, gateway_id=gateway_id, clock=clock)
        """Budgets spent from leases, so they hold across gateways (gateway/tenancy/leases.py)."""
        self.sync.leases = self.leases

    def authenticate(self, token: str) -> ApiKey | None:
        return self.book.authenticate(token) if token else None

    async def reserve(self, key: ApiKey) -> None:
        """Room on `key`'s budget for one more request, taken from the store when this gateway's lease runs low
        (no store call otherwise): await it before `admit`."""
        await self.leases.reserve(key)

    def admit(self, key: ApiKey, *, model: str, tier: str | None, tokens: int) -> Admission:
        """Admit a request of `key` for `model` at `tier` reserving `tokens`, or raise APIError (403 for what the
        key may not ask for, 429 over a limit; a budget is spent from the lease `reserve` took)."""
        policy = key.policy
        self._permit(key, "model", model, policy.models, "call model", "model")
        self._permit(key, "tier", tier or DEFAULT_TIER, policy.tiers, "ask for tier", "gridserve.tier")
        try:
            return self.limiter.admit(key, tokens)
        except OverLimit as exc:
            self.usage.refused(key, exc.code or "rate_limit_exceeded")
            raise

    def _permit(
        self, key: ApiKey, what: str, asked: str, allowed: tuple[str, ...] | None, verb: str, param: str
    ) -> None:
        """403 (code `<what>_not_allowed`) unless `asked` is among what the key is `allowed` (None: anything)."""
        if allowed is None or asked in allowed:
            return
        code = f"{what}_not_allowed"
        self.usage.refused(key, code)
        message = f"Key {key.name!r} may not {verb} {asked!r} (allowed: {', '.join(allowed) or 'none'}; set {param})."
        raise APIError(403, message, type_="permission_error", code=code, param=param)

    async def wait_for_room(self, admission: Admission, model: str) -> None:
        """Queue `admission`'s request until a node serving `model` has room for its class (fair among keys);
        raises APIError 503 past its class's deadline. Its place is given back when the admission closes."""
        key = admission.key
        try:
            admission.queue_wait_s = await self.queue.enter(model, key.policy.priority, key.key_id)
        except APIError as exc:
            self.usage.refused(key, exc.code or "queue_timeout")
            raise
        admission.releases.append(lambda: self.queue.leave(model))

    # -- the admin API's side ---------------------------------------------------------------------------------------
    async def create(self, name: str, policy: KeyPolicy) -> dict[str, Any]:
        """A new key, in force here at once (on the other gateways within a key sync): its view and, this once,
        the key itself (`key`)."""
        row, key = await asyncio.to_thread(self._insert, name, policy)
        self.book.apply([row])
        return {**view(from_row(row)), "key": key}

    async def revoke(self, key_id: str) -> dict[str, Any]:
        """Revoke a key, here at once (on the other gateways within a key sync); raises UnknownKey."""
        row = await asyncio.to_thread(self.keystore.revoke_key, key_id, self.clock())
        if row is None:
            raise UnknownKey(key_id)
        self.book.apply([row])
        return view(from_row(row))

    async def rotate(self, key_id: str) -> dict[str, Any]:
        """A new secret for an active key: the old one is refused here at once (on the other gateways within a key
        sync); its id, limits, counts and stored responses stay. Raises UnknownKey (no such key, or revoked)."""
        _, key = new_key(key_id)
        row = await asyncio.to_thread(self.keystore.rotate_key, key_id, key_digest(key), self.clock())
        if row is None:
            raise UnknownKey(key_id)
        self.book.apply([row])
        return {**view(from_row(row)), "key": key}

    def _insert(self, name: str, policy: KeyPolicy) -> tuple[dict[str, Any], str]:
        if not name.strip() or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"name must be 1 to {MAX_NAME_CHARS} characters")
        key_id, key = new_key()
        now = self.clock()
        row = {
            "key_id": key_id,
            "name": name,
            "digest": key_digest(key),
            "created_at": now,
            "updated_at": now,
            "revoked_at": None,
            "policy": policy.model_dump(mode="json"),
        }
        self.keystore.insert_key(row)
        return row, key

    def list_keys(self) -> list[dict[str, Any]]:
        """Every issued key (the store's, oldest first), never a key itself or its digest."""
        rows = self.keystore.keys_changed_since(0.0)
        return [view(k) for k in sorted((from_row(r) for r in rows), key=lambda k: (k.created_at, k.key_id))]


__all__ = ["Admission", "ApiKey", "KeyPolicy", "Tenancy", "UnknownKey"]
