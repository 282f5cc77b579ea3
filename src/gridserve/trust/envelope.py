"""Signed envelopes: `{"payload": {...}, "sig": {keyid, alg, purpose, created, expires, nonce, signature}}`.

The signature covers the canonical JSON (sorted keys, compact) of the payload together with every
signature parameter but the signature itself, as RFC 9421 covers its signature parameters. Binding the
`purpose` stops a heartbeat signature from being replayed as a registration.
"""

import heapq
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from nacl.encoding import Base64Encoder
from nacl.exceptions import BadSignatureError, CryptoError

from gridserve.trust.errors import (
    BadSignature,
    Expired,
    FromTheFuture,
    Malformed,
    Replayed,
    Unsigned,
    WrongSigner,
)
from gridserve.trust.identity import Identity, verify_key

ALG = "ed25519"


def canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _signed_bytes(payload: Any, params: dict[str, Any]) -> bytes:
    return canonical({"payload": payload, "params": params})


def sign_envelope(identity: Identity, payload: Any, *, purpose: str, now: float, lifetime_s: float = 30.0) -> bytes:
    """Serialize `payload` into a signed envelope valid from `now` for `lifetime_s` seconds."""
    params = {
        "keyid": identity.public_key,
        "alg": ALG,
        "purpose": purpose,
        "created": round(now, 3),
        "expires": round(now + lifetime_s, 3),
        "nonce": secrets.token_urlsafe(16),
    }
    signature = identity.sign(_signed_bytes(payload, params))
    return canonical({"payload": payload, "sig": {**params, "signature": signature}})


@dataclass(frozen=True)
class Envelope:
    """A verified envelope: who signed it, for what, and the payload."""

    keyid: str
    purpose: str
    created: float
    expires: float
    nonce: str
    payload: Any


@dataclass(frozen=True, kw_only=True)
class FreshnessPolicy:
    max_skew_s: float = 30.0
    """Allowed clock difference between signer and verifier (AWS SigV4 allows 300 s; nodes sync faster)."""
    max_lifetime_s: float = 120.0
    """Longest accepted `expires - created`; longer-lived messages are refused as replay bait."""


class NonceCache:
    """Remembers (keyid, nonce) until the message could no longer pass the freshness check.

    Entries leave in order of `forget_at` (a heap beside the dict): each call forgets only what has expired
    since the last one, so no call rebuilds the whole cache (at thousands of messages a second, a periodic
    rebuild stalled the event loop for tens of ms). An entry is kept while `forget_at >= now`. Thread-safe.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, tuple[str, str]]] = []
        self._lock = threading.Lock()

    def check_and_add(self, keyid: str, nonce: str, forget_at: float, now: float) -> bool:
        with self._lock:
            expiry, seen = self._expiry, self._seen
            while expiry and expiry[0][0] < now:
                del seen[heapq.heappop(expiry)[1]]
            key = (keyid, nonce)
            if key in seen:
                return False
            seen[key] = forget_at
            heapq.heappush(expiry, (forget_at, key))
            return True

    def __len__(self) -> int:
        return len(self._seen)


SIG_FIELD_CHARS = {"keyid": 64, "purpose": 40, "nonce": 64, "signature": 128}
"""The longest each signature parameter may be (an Ed25519 key and signature in base64 are 44 and 88 characters)."""


def _params(doc: Any) -> tuple[Any, dict[str, Any]]:
    if not isinstance(doc, dict) or "payload" not in doc:
        raise Malformed("body is not a signed envelope (need 'payload' and 'sig')")
    sig = doc.get("sig")
    if not isinstance(sig, dict) or "signature" not in sig:
        raise Unsigned("message carries no signature")
    needed = ("keyid", "alg", "purpose", "created", "expires", "nonce")
    unknown = sorted(set(doc) - {"payload", "sig"})
    if unknown:  # outside the signature: nothing may ride along unauthenticated
        raise Malformed(f"unknown envelope fields: {', '.join(unknown[:5])[:200]}")
    missing = [k for k in needed if k not in sig]
    if missing:
        raise Malformed(f"signature parameters missing: {', '.join(missing)}")
    if sig["alg"] != ALG:
        raise Malformed(f"unsupported alg {str(sig['alg'])[:40]!r}; only {ALG}")
    if not isinstance(sig["purpose"], str) or not isinstance(sig["nonce"], str):
        raise Malformed("purpose and nonce must be strings")
    too_long = [k for k, most in SIG_FIELD_CHARS.items() if isinstance(sig[k], str) and len(sig[k]) > most]
    if too_long:  # (kept in the nonce cache, quoted in refusals: bounded before anything else reads them)
        raise Malformed(f"signature parameter(s) too long: {', '.join(too_long)}")
    if not all(isinstance(sig[k], int | float) and not isinstance(sig[k], bool) for k in ("created", "expires")):
        raise Malformed("created and expires must be numbers (unix seconds)")
    return doc["payload"], dict(sig)


class EnvelopeVerifier:
    """Checks signature, signer, purpose, freshness and replay. Thread-safe."""

    def __init__(self, policy: FreshnessPolicy, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.clock = clock
        self.nonces = NonceCache()

    def verify(self, body: bytes, *, purpose: str, expected_keyid: str | None = None) -> Envelope:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Malformed(f"body is not JSON: {exc}") from exc
        payload, sig = _params(doc)
        signature = sig.pop("signature")
        if sig["purpose"] != purpose:
            raise WrongSigner(f"signed for {sig['purpose'][:40]!r}, not {purpose!r}")
        if expected_keyid is not None and sig["keyid"] != expected_keyid:
            raise WrongSigner("signed by a key that is not allowed to send this message")
        if not isinstance(sig["keyid"], str) or not isinstance(signature, str):
            raise BadSignature("keyid and signature must be base64 strings")
        try:
            verify_key(sig["keyid"]).verify(_signed_bytes(payload, sig), Base64Encoder.decode(str(signature).encode()))
        except (BadSignatureError, CryptoError, ValueError, TypeError) as exc:
            raise BadSignature("signature does not verify for the claimed key") from exc
        self._check_fresh(sig)
        return Envelope(
            keyid=sig["keyid"],
            purpose=sig["purpose"],
            created=float(sig["created"]),
            expires=float(sig["expires"]),
            nonce=str(sig["nonce"]),
            payload=payload,
        )

    def _check_fresh(self, sig: dict[str, Any]) -> None:
        now = self.clock()
        created, expires = float(sig["created"]), float(sig["expires"])
        skew = self.policy.max_skew_s
        if created > now + skew:
            raise FromTheFuture(f"created {created - now:.1f} s in the future (allowed skew {skew:.0f} s)")
        if expires < now - skew:
            raise Expired(f"expired {now - expires:.1f} s ago (allowed skew {skew:.0f} s)")
        if expires - created > self.policy.max_lifetime_s or expires < created:
            raise Expired(f"lifetime {expires - created:.0f} s exceeds {self.policy.max_lifetime_s:.0f} s")
        if not self.nonces.check_and_add(str(sig["keyid"]), str(sig["nonce"]), expires + skew, now):
            raise Replayed("nonce already used: replayed message")
