"""Keeps this gateway's keys and counters in step with the store, every `interval_s`, off the event loop.

One tick: write this gateway's counters that moved (and those of keys with requests in flight, so that the other
gateways know they are still live), read the keys that changed (a revocation is in force here within one tick), and
read the other gateways' counters for this minute and the running totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from gridserve.gateway.tenancy.book import KeyBook
from gridserve.gateway.tenancy.leases import BudgetLeases
from gridserve.gateway.tenancy.limits import WINDOW_S, Counts, Limiter
from gridserve.store import KeyStore

log = logging.getLogger("gridserve.gateway")

KEY_SLACK_S = 2.0
"""Key rows are re-read this far behind the newest change seen (other gateways' clocks and commit delays)."""
LIVE_S = 5.0
"""Another gateway's requests in flight count while its row is this fresh (a stopped gateway's age out)."""
PRUNE_EVERY_S = 60.0
KEEP_WINDOWS_S = 3600.0
"""Per-minute rows are kept this long (usage reports read them)."""


class TenancySync:
    def __init__(
        self,
        keystore: KeyStore,
        book: KeyBook,
        limiter: Limiter,
        *,
        gateway_id: str,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keystore, self.book, self.limiter = keystore, book, limiter
        self.gateway_id = gateway_id
        self.interval_s = interval_s
        self.clock = clock
        self.leases: BudgetLeases | None = None
        """Renewed with each sync where budgets are spent from leases (gateway/tenancy/leases.py)."""
        self.last_error = ""
        self.last_sync_at = 0.0
        self._pruned_at = 0.0

    def load(self) -> None:
        """At start (blocking): every key, and this gateway's own counters if it ran before under this id."""
        self.book.apply(self.keystore.keys_changed_since(0.0))
        now = self.clock()
        window = self.limiter.window(now)
        for row in self.keystore.own_usage(self.gateway_id, [0.0, window]):
            own = self.limiter.counts(str(row["key_id"])).own
            if float(row["window_start"]) == 0.0:
                own.spent_usd, own.errors = float(row["spent_usd"]), int(row["errors"])
            else:
                own.roll(window)
                own.requests, own.tokens = int(row["requests"]), int(row["tokens"])

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sync_once()
            except Exception as exc:  # the database may be restarting: keep deciding from memory
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("key sync failed: %s", self.last_error)

    async def sync_once(self) -> None:
        now = self.clock()
        window = self.limiter.window(now)
        rows = self._own_rows(window, now)
        try:
            keys, sums = await asyncio.to_thread(self._exchange, rows, window, now)
        except BaseException:
            for key_id in {str(r["key_id"]) for r in rows}:  # not stored: written by the next sync
                self.limiter.counts(key_id).dirty = True
            raise
        self.book.apply(keys)
        self._take_sums(sums, window)
        if self.leases is not None:
            await self.leases.give_back_idle()
        self.last_sync_at = now
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.keystore.prune_usage, now - KEEP_WINDOWS_S)

    def _own_rows(self, window: float, now: float) -> list[dict[str, Any]]:
        """This gateway's counters to write (absolute values): those that moved, and those with work in flight."""
        rows: list[dict[str, Any]] = []
        for key_id, counts in self.limiter.keys.items():
            own = counts.own
            if not counts.dirty and own.inflight <= 0:
                continue
            counts.dirty = False
            base = {"key_id": key_id, "gateway_id": self.gateway_id, "updated_at": now}
            rows.append({**base, **_totals(own)})
            own.roll(window)
            rows.append(
                {
                    **base,
                    "window_start": window,
                    "requests": own.requests,
                    "tokens": own.tokens,
                    "spent_usd": 0.0,
                    "errors": 0,
                    "inflight": 0,
                }
            )
        return rows

    def _exchange(
        self, rows: list[dict[str, Any]], window: float, now: float
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """In a thread: write ours, read the keys that changed and the others' sums."""
        self.keystore.put_usage(rows)
        keys = self.keystore.keys_changed_since(max(0.0, self.book.cursor - KEY_SLACK_S))
        sums = self.keystore.usage_sums([0.0, window], exclude_gateway=self.gateway_id, live_since=now - LIVE_S)
        return keys, sums

    def _take_sums(self, sums: list[dict[str, Any]], window: float) -> None:
        fresh: dict[str, Counts] = {}
        for row in sums:
            got = fresh.setdefault(str(row["key_id"]), Counts(window=window))
            if float(row["window_start"]) == 0.0:
                got.spent_usd = float(row["spent_usd"] or 0.0)
                got.errors = int(row["errors"] or 0)
                got.inflight = int(row["inflight"] or 0)
            elif float(row["window_start"]) == window:
                got.requests, got.tokens = int(row["requests"] or 0), int(row["tokens"] or 0)
        for key_id, counts in self.limiter.keys.items():
            counts.others = fresh.pop(key_id, Counts(window=window))
        for key_id, counts_of_others in fresh.items():
            self.limiter.counts(key_id).others = counts_of_others


def _totals(own: Counts) -> dict[str, Any]:
    return {
        "window_start": 0.0,
        "requests": 0,
        "tokens": 0,
        "spent_usd": own.spent_usd,
        "errors": own.errors,
        "inflight": max(0, own.inflight),
    }


__all__ = ["LIVE_S", "WINDOW_S", "TenancySync"]
