"""The tunnel's greeting, which proves both ends' keys before any exchange and binds every later frame to it:

1. gateway -> node  CHALLENGE  `{"challenge": <fresh random>}`
2. node -> gateway  HELLO      envelope signed by the node (purpose `tunnel-hello`):
                               `{"node_id", "challenge": <the gateway's>, "nonce": <fresh random>, "kx": <X25519>}`
3. gateway -> node  WELCOME    envelope signed by the gateway (purpose `tunnel-welcome`):
                               `{"node_id", "nonce": <the node's>, "kx": <X25519>, "heartbeat_interval_s",
                                 "beats": "channel"}`

Each side signs the other's fresh random value, so neither message can be replayed into another connection (and
the envelopes' own freshness and nonce checks apply as to every node message). The node checks the welcome against
the gateway key it pinned or learned at registration; the gateway checks that the hello's key is the node's
(`node_id` is derived from it). The two `kx` values are ephemeral X25519 keys: the secret they make keys the tag of
every later frame (channel.py). `"beats": "channel"` says the gateway takes heartbeats as bare BEAT frames, which
the channel authenticates (wire.py); a welcome without it (an older gateway) gets signed HEARTBEAT frames.
"""

import secrets
import time
from dataclasses import dataclass

from gridserve.trust import EnvelopeVerifier, Identity, Malformed, TrustError, WrongSigner, node_id_for, sign_envelope
from gridserve.tunnel.channel import Ephemeral, Opener, Sealer, gateway_side, node_side

HELLO = "tunnel-hello"
WELCOME = "tunnel-welcome"
LIFETIME_S = 30.0
CHANNEL_BEATS = "channel"
"""The welcome's `beats` value for a gateway that takes BEAT frames."""


class WrongChallenge(TrustError):
    """A greeting that does not sign the other side's fresh value: made for another connection (a replay)."""

    kind = "wrong_challenge"


def challenge() -> str:
    return secrets.token_urlsafe(24)


def _transcript(gateway_challenge: str, nonce: str) -> bytes:
    return f"{gateway_challenge}|{nonce}".encode()


@dataclass
class NodeGreeting:
    """What the node keeps between its hello and the gateway's welcome."""

    body: bytes
    challenge: str
    nonce: str
    exchange: Ephemeral


def hello(identity: Identity, gateway_challenge: str) -> NodeGreeting:
    """The node's signed hello (and what checking the welcome needs)."""
    nonce, exchange = secrets.token_urlsafe(24), Ephemeral()
    payload = {"node_id": identity.node_id, "challenge": gateway_challenge, "nonce": nonce, "kx": exchange.public}
    body = sign_envelope(identity, payload, purpose=HELLO, now=time.time(), lifetime_s=LIFETIME_S)
    return NodeGreeting(body, gateway_challenge, nonce, exchange)


@dataclass(frozen=True)
class Hello:
    node_id: str
    public_key: str
    nonce: str
    exchange_key: str


def check_hello(verifier: EnvelopeVerifier, body: bytes, sent_challenge: str) -> Hello:
    """The node that said hello; TrustError if the hello is not a fresh answer to this connection's challenge."""
    envelope = verifier.verify(body, purpose=HELLO)
    payload = envelope.payload
    if not isinstance(payload, dict) or payload.get("challenge") != sent_challenge:
        raise WrongChallenge("the hello does not answer this connection's challenge")
    node_id = payload.get("node_id")
    if node_id != node_id_for(envelope.keyid):
        raise WrongSigner("the hello names a node other than the key that signed it")
    nonce, exchange_key = payload.get("nonce"), payload.get("kx")
    if not isinstance(nonce, str) or not nonce or not isinstance(exchange_key, str):
        raise Malformed("the hello carries no nonce or no exchange key")
    return Hello(node_id, envelope.keyid, nonce, exchange_key)


def welcome(
    identity: Identity, greeted: Hello, sent_challenge: str, heartbeat_interval_s: float
) -> tuple[bytes, Sealer, Opener]:
    """The gateway's signed welcome, and its ends of the channel."""
    exchange = Ephemeral()
    payload = {
        "node_id": greeted.node_id,
        "nonce": greeted.nonce,
        "kx": exchange.public,
        "heartbeat_interval_s": heartbeat_interval_s,
        "beats": CHANNEL_BEATS,
    }
    body = sign_envelope(identity, payload, purpose=WELCOME, now=time.time(), lifetime_s=LIFETIME_S)
    shared = exchange.shared(greeted.exchange_key)
    return body, *gateway_side(shared, _transcript(sent_challenge, greeted.nonce))


@dataclass(frozen=True)
class Welcomed:
    gateway_key: str
    sealer: Sealer
    opener: Opener
    channel_beats: bool
    """The gateway takes heartbeats as BEAT frames (its welcome says `"beats": "channel"`)."""


def check_welcome(
    verifier: EnvelopeVerifier, body: bytes, greeting: NodeGreeting, *, node_id: str, gateway_key: str | None
) -> Welcomed:
    """The gateway's key and the node's ends of the channel, once the welcome is checked (against `gateway_key`
    when the node knows it)."""
    envelope = verifier.verify(body, purpose=WELCOME, expected_keyid=gateway_key)
    payload = envelope.payload
    if not isinstance(payload, dict) or payload.get("nonce") != greeting.nonce or payload.get("node_id") != node_id:
        raise WrongChallenge("the welcome does not answer this node's hello")
    exchange_key = payload.get("kx")
    if not isinstance(exchange_key, str):
        raise Malformed("the welcome carries no exchange key")
    shared = greeting.exchange.shared(exchange_key)
    sealer, opener = node_side(shared, _transcript(greeting.challenge, greeting.nonce))
    return Welcomed(envelope.keyid, sealer, opener, payload.get("beats") == CHANNEL_BEATS)
