"""The tunnel's greeting, which proves both ends' keys before any exchange:

1. gateway -> node  CHALLENGE  `{"challenge": <fresh random>}`
2. node -> gateway  HELLO      envelope signed by the node (purpose `tunnel-hello`):
                               `{"node_id", "challenge": <the gateway's>, "nonce": <fresh random>}`
3. gateway -> node  WELCOME    envelope signed by the gateway (purpose `tunnel-welcome`):
                               `{"node_id", "nonce": <the node's>, "heartbeat_interval_s"}`

Each side signs the other's fresh random value, so neither message can be replayed into another connection (and
the envelopes' own freshness and nonce checks apply as to every node message). The node checks the welcome against
the gateway key it pinned or learned at registration; the gateway checks that the hello's key is the node's
(`node_id` is derived from it) and, once the node has registered, the key it registered with.
"""

import secrets
import time
from dataclasses import dataclass

from gridserve.trust import EnvelopeVerifier, Identity, Malformed, TrustError, WrongSigner, node_id_for, sign_envelope

HELLO = "tunnel-hello"
WELCOME = "tunnel-welcome"
LIFETIME_S = 30.0


class WrongChallenge(TrustError):
    """A greeting that does not sign the other side's fresh value: made for another connection (a replay)."""

    kind = "wrong_challenge"


def challenge() -> str:
    return secrets.token_urlsafe(24)


def hello(identity: Identity, gateway_challenge: str) -> tuple[bytes, str]:
    """The node's signed hello and the nonce the gateway's welcome must sign back."""
    nonce = secrets.token_urlsafe(24)
    payload = {"node_id": identity.node_id, "challenge": gateway_challenge, "nonce": nonce}
    return sign_envelope(identity, payload, purpose=HELLO, now=time.time(), lifetime_s=LIFETIME_S), nonce


@dataclass(frozen=True)
class Hello:
    node_id: str
    public_key: str
    nonce: str


def check_hello(verifier: EnvelopeVerifier, body: bytes, sent_challenge: str) -> Hello:
    """The node that said hello; TrustError if the hello is not a fresh answer to this connection's challenge."""
    envelope = verifier.verify(body, purpose=HELLO)
    payload = envelope.payload
    if not isinstance(payload, dict) or payload.get("challenge") != sent_challenge:
        raise WrongChallenge("the hello does not answer this connection's challenge")
    node_id = payload.get("node_id")
    if node_id != node_id_for(envelope.keyid):
        raise WrongSigner("the hello names a node other than the key that signed it")
    nonce = payload.get("nonce")
    if not isinstance(nonce, str) or not nonce:
        raise Malformed("the hello carries no nonce")
    return Hello(node_id, envelope.keyid, nonce)


def welcome(identity: Identity, greeted: Hello, heartbeat_interval_s: float) -> bytes:
    payload = {"node_id": greeted.node_id, "nonce": greeted.nonce, "heartbeat_interval_s": heartbeat_interval_s}
    return sign_envelope(identity, payload, purpose=WELCOME, now=time.time(), lifetime_s=LIFETIME_S)


def check_welcome(verifier: EnvelopeVerifier, body: bytes, *, node_id: str, nonce: str, gateway_key: str | None) -> str:
    """The gateway's key, once its welcome is checked (against `gateway_key` when the node knows it)."""
    envelope = verifier.verify(body, purpose=WELCOME, expected_keyid=gateway_key)
    payload = envelope.payload
    if not isinstance(payload, dict) or payload.get("nonce") != nonce or payload.get("node_id") != node_id:
        raise WrongChallenge("the welcome does not answer this node's hello")
    return envelope.keyid
