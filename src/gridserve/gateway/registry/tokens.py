"""Join tokens: a permissioned grid admits only the node identities its admin handed a token to.

The admin creates a token (`POST /admin/tokens`, `gridserve tokens create`): the gateway returns it once and
stores only its SHA-256 digest. A token reads `gsj_<id>.<secret>`: the id finds its row, the digest of the whole
token is compared in constant time. A node sends it with its registration in the `X-Gridserve-Join-Token` header
(outside the signed document); on a gateway started with `--join-tokens`, a registration without a valid one is
refused (401 `join_token`).

A token admits up to `uses` distinct node identities (keys). Redeeming it binds it to the registering node's id,
after the registration's signature is verified (only the key's holder can bind it): that node registering again
(a restart, a model loaded) passes without using up anything, even once the token has expired (expiry ends the
admission of new identities); a new identity beyond `uses` is refused. A revoked token admits no one again, bound
nodes included (those on the grid stay until they re-register: quarantine them to stop their work at once).

Tokens live in the gateway's store (`join_tokens`), so they survive restarts and are shared by the gateways of
one database; a redemption reads and binds in one transaction.
"""

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from gridserve.store import Store
from gridserve.trust import EnvelopeVerifier, TrustError, node_id_for
from gridserve.types.node import JOIN_TOKEN_HEADER

PREFIX = "gsj_"
MAX_USES = 10_000
"""Most node identities one token may admit."""
MAX_TOKEN_CHARS = 200
"""A presented token longer than this is not one of ours (and is not hashed)."""
MISSING = (
    "this gateway admits only nodes holding a join token; ask its operator for one (gridserve tokens create)"
    " and start the node with --join-token"
)
UNKNOWN = "join token not recognized by this gateway; ask its operator for a valid one (gridserve tokens create)"


class JoinRefused(TrustError):
    """A registration without a join token this gateway accepts for the registering node."""

    kind = "join_token"


class UnknownToken(LookupError):
    """No join token with this id."""


def digest(token: str) -> str:
    """SHA-256 of the token, hex: what the store keeps."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_id_of(token: str) -> str | None:
    """The id part of `gsj_<id>.<secret>`, or None when the text is not shaped like a join token."""
    if len(token) > MAX_TOKEN_CHARS or not token.startswith(PREFIX):
        return None
    token_id, dot, secret = token[len(PREFIX) :].partition(".")
    return token_id if dot and token_id and secret else None


def status(row: dict[str, Any], now: float) -> str:
    """active, used (every use bound), expired or revoked."""
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    return "used" if len(row["node_ids"]) >= row["uses"] else "active"


def view(row: dict[str, Any], now: float) -> dict[str, Any]:
    """What the admin API shows of a token: everything but its digest (the token itself is never kept)."""
    return {
        "id": row["token_id"],
        "label": row["label"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "uses": row["uses"],
        "uses_left": max(0, row["uses"] - len(row["node_ids"])),
        "node_ids": list(row["node_ids"]),
        "status": status(row, now),
        "revoked_at": row["revoked_at"],
    }


def _matches(row: dict[str, Any], token: str) -> bool:
    return hmac.compare_digest(str(row["digest"]), digest(token))


def bind(row: dict[str, Any], token: str, node_id: str, now: float) -> dict[str, Any]:
    """The change redeeming `token` for `node_id` makes to the token's row ({}: none, the node is bound already);
    raises JoinRefused if the token does not admit that node."""
    if not _matches(row, token):
        raise JoinRefused(UNKNOWN)
    name = row["token_id"]
    if row["revoked_at"] is not None:
        raise JoinRefused(f"join token {name} was revoked; ask the gateway's operator for a new one")
    if node_id in row["node_ids"]:
        return {}
    if row["expires_at"] is not None and row["expires_at"] <= now:
        raise JoinRefused(f"join token {name} has expired; ask the gateway's operator for a new one")
    if len(row["node_ids"]) >= row["uses"]:
        raise JoinRefused(
            f"join token {name} has admitted its {row['uses']} node identit{'y' if row['uses'] == 1 else 'ies'}"
            " already; ask the gateway's operator for another (gridserve tokens create --uses N)"
        )
    return {"node_ids": [*row["node_ids"], node_id]}


class JoinTokens:
    """Create, list, revoke and redeem join tokens; the state is the store's."""

    def __init__(self, store: Store, verifier: EnvelopeVerifier, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.verifier = verifier
        """Verifies a registration's signature before its key may bind a token: a verifier of its own (its nonce
        memory apart), so the registration's own verification after it still passes."""
        self.clock = clock

    def create(
        self, *, label: str = "", uses: int = 1, expires_in_s: float | None = None, expires_at: float | None = None
    ) -> dict[str, Any]:
        """A new token: its view and, this once, the token itself (`token`)."""
        if not 1 <= uses <= MAX_USES:
            raise ValueError(f"uses must be 1 to {MAX_USES}")
        now = self.clock()
        if expires_in_s is not None:
            expires_at = now + expires_in_s
        if expires_at is not None and expires_at <= now:
            raise ValueError("the expiry is in the past")
        token_id = secrets.token_hex(6)
        token = f"{PREFIX}{token_id}.{secrets.token_urlsafe(32)}"
        row = {
            "token_id": token_id,
            "label": label,
            "digest": digest(token),
            "created_at": now,
            "expires_at": expires_at,
            "uses": uses,
            "node_ids": [],
            "revoked_at": None,
        }
        self.store.insert_join_token(row)
        return {**view(row, now), "token": token}

    def list_tokens(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [view(row, now) for row in self.store.list_join_tokens()]

    def revoke(self, token_id: str) -> dict[str, Any]:
        """Revoke a token (again: no change); raises UnknownToken."""
        now = self.clock()
        row = self.store.change_join_token(token_id, lambda r: {"revoked_at": r["revoked_at"] or now})
        if row is None:
            raise UnknownToken(token_id)
        return view(row, now)

    def redeem(self, token: str, node_id: str) -> dict[str, Any]:
        """Admit `node_id` with `token`, binding the token to it if it is a new identity (one transaction);
        raises JoinRefused. Returns the token's view."""
        token_id = token_id_of(token)
        if token_id is None:
            raise JoinRefused(UNKNOWN)
        now = self.clock()
        row = self.store.change_join_token(token_id, lambda r: bind(r, token, node_id, now))
        if row is None:
            raise JoinRefused(UNKNOWN)
        return view(row, now)

    async def admit(self, token: str | None, body: bytes) -> str:
        """Check a registration (`body`, its signed envelope) against the join token it came with, before the
        node is accepted: the token must be valid and admit the signing key's node id. Returns the node id;
        raises JoinRefused, or the envelope's TrustError if its signature does not verify."""
        token = (token or "").strip()
        if not token:
            raise JoinRefused(MISSING)
        if token_id_of(token) is None:
            raise JoinRefused(UNKNOWN)
        node_id = node_id_for(self.verifier.verify(body, purpose="register").keyid)
        await asyncio.to_thread(self.redeem, token, node_id)
        return node_id


__all__ = ["JOIN_TOKEN_HEADER", "JoinRefused", "JoinTokens", "UnknownToken", "digest", "token_id_of"]
