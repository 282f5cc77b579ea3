"""Which keys this gateway accepts: the --api-key keys, and the issued keys as the store last said (one owner)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from gridserve.gateway.tenancy.keys import NO_LIMITS, ApiKey, digest, from_row, key_id_of


class KeyBook:
    def __init__(self, static_keys: Iterable[str] = ()) -> None:
        self._static = [
            (
                key.encode(),
                ApiKey(
                    key_id=f"static-{digest(key)[:12]}",
                    name=f"--api-key {n}",
                    digest=digest(key),
                    policy=NO_LIMITS,
                    static=True,
                ),
            )
            for n, key in enumerate((k for k in static_keys if k), 1)
        ]
        self._issued: dict[str, ApiKey] = {}
        self._changed_at: dict[str, float] = {}
        """Each issued key's `updated_at` as this book holds it."""
        self.cursor = 0.0
        """The latest `updated_at` read from the store."""

    def authenticate(self, token: str) -> ApiKey | None:
        """The key `token` is, if this gateway accepts it (an issued key that was revoked is not accepted)."""
        key_id = key_id_of(token)
        if key_id is not None:
            issued = self._issued.get(key_id)
            if issued is not None and issued.revoked_at is None and issued.matches(token):
                return issued
        raw = token.encode()
        return next((key for value, key in self._static if hmac.compare_digest(raw, value)), None)

    def get(self, key_id: str) -> ApiKey | None:
        return self._issued.get(key_id) or next((k for _, k in self._static if k.key_id == key_id), None)

    def issued(self) -> list[ApiKey]:
        return sorted(self._issued.values(), key=lambda k: (k.created_at, k.key_id))

    def apply(self, rows: Iterable[dict[str, Any]]) -> list[ApiKey]:
        """Take the store's rows of keys that changed; returns the keys newly revoked here."""
        revoked: list[ApiKey] = []
        for row in rows:
            at = float(row["updated_at"])
            if at < self._changed_at.get(str(row["key_id"]), at):
                continue  # read before a change this book holds (a key sync that began before a rotation here)
            key = from_row(row)
            before = self._issued.get(key.key_id)
            self._issued[key.key_id] = key
            self._changed_at[key.key_id] = at
            if key.revoked_at is not None and (before is None or before.revoked_at is None):
                revoked.append(key)
            self.cursor = max(self.cursor, at)
        return revoked
