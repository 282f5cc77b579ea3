"""API keys: what a key is, how it looks, and what the admin API shows of it.

A key reads `gsk_<id>.<secret>`: the id finds its record, the SHA-256 digest of the whole key is compared in constant
time. The store keeps the digest only; the key itself is shown once, when it is made. Keys given on the command line
(`--api-key`) stay valid: they are keys without limits, named `--api-key N`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PREFIX = "gsk_"
MAX_KEY_CHARS = 200
"""A presented key longer than this is not one of ours (and is not hashed)."""
Priority = Literal["interactive", "standard", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "standard", "batch")
"""Priority classes, first served first when the grid is saturated."""


class KeyPolicy(BaseModel):
    """A key's limits and permissions (every member optional: none means no limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    rpm: int | None = Field(default=None, ge=1, le=10_000_000, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, le=10_000_000_000, description="tokens per minute (prompt + output)")
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000, description="requests in flight at once")
    budget_usd: float | None = Field(default=None, gt=0, le=1e9, description="spend limit in US dollars, for ever")
    models: tuple[str, ...] | None = Field(default=None, max_length=1000, description="models it may call")
    tiers: tuple[str, ...] | None = Field(default=None, max_length=10, description="tiers it may ask for")
    priority: Priority = Field(default="standard", description="class when requests queue")

    @field_validator("models", "tiers", mode="before")
    @classmethod
    def _arrays(cls, value: Any) -> Any:
        """JSON has arrays, not tuples: a list is taken as a tuple (its members still strictly strings)."""
        return tuple(value) if isinstance(value, list) else value


NO_LIMITS = KeyPolicy()


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    name: str
    digest: str
    policy: KeyPolicy
    created_at: float = 0.0
    revoked_at: float | None = None
    static: bool = False
    """Given with --api-key (no record in the store)."""

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.digest, digest(key))


def digest(key: str) -> str:
    """SHA-256 of the key, hex: what the store keeps."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id part of `gsk_<id>.<secret>`, or None when the text is not shaped like an issued key."""
    if len(key) > MAX_KEY_CHARS or not key.startswith(PREFIX):
        return None
    key_id, dot, secret = key[len(PREFIX) :].partition(".")
    return key_id if dot and key_id and secret else None


def new_key(key_id: str | None = None) -> tuple[str, str]:
    """(id, key) of a fresh key: 256 random bits behind a 48-bit id (`key_id`: a new secret for that id)."""
    key_id = key_id or secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}.{secrets.token_urlsafe(32)}"


def from_row(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        key_id=str(row["key_id"]),
        name=str(row["name"]),
        digest=str(row["digest"]),
        policy=KeyPolicy.model_validate(row["policy"], strict=False),
        created_at=float(row["created_at"]),
        revoked_at=None if row["revoked_at"] is None else float(row["revoked_at"]),
    )


def view(key: ApiKey) -> dict[str, Any]:
    """What the admin API shows of a key: everything but its digest."""
    return {
        "id": key.key_id,
        "name": key.name,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "status": "revoked" if key.revoked_at is not None else "active",
        **key.policy.model_dump(mode="json"),
    }
