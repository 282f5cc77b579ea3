"""Identity, signed envelopes with freshness and replay protection."""

from gridserve.trust.envelope import (
    Envelope,
    EnvelopeVerifier,
    FreshnessPolicy,
    sign_envelope,
)
from gridserve.trust.errors import (
    BadSignature,
    Expired,
    FromTheFuture,
    Malformed,
    Replayed,
    TrustError,
    Unsigned,
    WrongSigner,
)
from gridserve.trust.identity import Identity, load_or_create_identity, node_id_for

__all__ = [
    "BadSignature",
    "Envelope",
    "EnvelopeVerifier",
    "Expired",
    "FreshnessPolicy",
    "FromTheFuture",
    "Identity",
    "Malformed",
    "Replayed",
    "TrustError",
    "Unsigned",
    "WrongSigner",
    "load_or_create_identity",
    "node_id_for",
    "sign_envelope",
]
