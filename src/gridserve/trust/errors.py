"""Why a signed message was refused.

TrustError
 ├── Malformed      the body is not an envelope at all
 ├── Unsigned       no signature block
 ├── BadSignature   the signature does not verify for the claimed key
 ├── WrongSigner    a valid signature, but not by the key that must sign this message
 ├── Expired        past its `expires` (beyond the allowed clock skew) or lived too long
 ├── FromTheFuture  `created` is further ahead than the allowed clock skew
 └── Replayed       the nonce was seen before
"""


class TrustError(Exception):
    """A message failed a trust check. `kind` is a stable machine-readable name."""

    kind = "trust_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


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
