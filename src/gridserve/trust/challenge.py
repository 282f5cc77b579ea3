"""Health probes bound to keys: each probe of a node's `GET /health?challenge=C` carries a fresh random `C`, and the
node answers with `node_id` and `challenge_signature`, its Ed25519 signature over the canonical JSON
`{"challenge": C, "node_id": ID, "purpose": "probe"}`. The gateway checks it against the key the node registered:
an endpoint that answers for another key (or for none) is not alive for this one. One endpoint, one identity: a new
identity registered with an honest node's address fails every probe (docs/protocol.md, "Health probes")."""

import secrets

import orjson
from nacl.encoding import Base64Encoder
from nacl.exceptions import BadSignatureError, CryptoError

from gridserve.trust.envelope import canonical
from gridserve.trust.identity import Identity, verify_key

MAX_CHALLENGE = 64
"""Longest challenge a node signs (the gateway sends 22 characters)."""


def fresh_challenge() -> str:
    return secrets.token_urlsafe(16)


def _message(challenge: str, node_id: str) -> bytes:
    return canonical({"challenge": challenge, "node_id": node_id, "purpose": "probe"})


def answer(identity: Identity, challenge: str) -> str:
    """The node's signature for `challenge` ("" for one too long to sign)."""
    return identity.sign(_message(challenge, identity.node_id)) if len(challenge) <= MAX_CHALLENGE else ""


def check(public_key: str, node_id: str, challenge: str, body: bytes) -> str:
    """Why a probe's answer is not this identity's ("" when it is)."""
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "the answer is not JSON"
    if not isinstance(reply, dict):
        return "the answer is not a JSON object"
    answered = reply.get("node_id")
    if answered != node_id:
        return f"the endpoint answers as {str(answered)[:48]!r}, not as this node"
    signature = reply.get("challenge_signature")
    if not isinstance(signature, str) or not signature:
        return "the answer does not sign the probe's challenge"
    try:
        verify_key(public_key).verify(_message(challenge, node_id), Base64Encoder.decode(signature.encode()))
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        return "the challenge is not signed by this node's key"
    return ""
