"""Why a signed message was refused.

TrustError
 ├── Malformed      the body is not an envelope at all
 ├── Unsigned       no signature block
 ├── BadSignature   the signature does not verify for the claimed key
 ├── WrongSigner    a valid signature, but not by the key that must sign this message
 ├── Expired        past its `expires` (beyond the allowed clock skew) or lived too long
 ├── FromTheFuture  `created` is further ahead than the allowed clock skew
 ├── Replayed       the nonce was seen before
 └── RateLimited    too many registrations from one address or in all right now
"""

DETAIL_CHARS = 300
"""The longest detail a refusal carries: it goes back to the sender and into the gateway's log and store, and part of
it may come from the refused message (never echo a sender's megabytes back, or write them down)."""


class TrustError(Exception):
    """A message failed a trust check. `kind` is a stable machine-readable name."""

    kind = "trust_error"

    def __init__(self, detail: str) -> None:
        if len(detail) > DETAIL_CHARS:
            detail = f"{detail[:DETAIL_CHARS]}... ({len(detail) - DETAIL_CHARS} more characters)"
        super().__init__(detail)
        self.detail = detail


class RateLimited(TrustError):
    """Too many messages of this kind from this source, or from all sources, right now (registrations)."""

    kind = "rate_limited"

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Malformed(TrustError):
    kind = "malformed"


class Unsigned(TrustError):
    kind = "unsigned"


class BadSignature(TrustError):
    kind = "bad_signature"


class WrongSigner(TrustError):
    kind = "wrong_signer"


class Expired(TrustError):
    kind = "expired"


class FromTheFuture(TrustError):
    kind = "from_the_future"


class Replayed(TrustError):
    kind = "replayed"
