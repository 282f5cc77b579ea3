"""The tunnel's channel (tunnel/channel.py): after the signed greeting, every frame carries a tag keyed by the
secret the two ephemeral keys make; forged, altered, replayed, dropped or reordered frames fail it."""

import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridserve.trust import BadSignature, EnvelopeVerifier, FreshnessPolicy, Identity
from gridserve.tunnel import handshake
from gridserve.tunnel.channel import Opener, Sealer
from gridserve.tunnel.wire import BadFrame, Kind

NODE, GATEWAY = Identity.generate(), Identity.generate()


def verifier() -> EnvelopeVerifier:
    return EnvelopeVerifier(FreshnessPolicy(), time.time)


def greet() -> tuple[tuple[Sealer, Opener], tuple[Sealer, Opener]]:
    """A whole greeting: ((node's sealer, opener), (gateway's sealer, opener))."""
    challenge = handshake.challenge()
    greeting = handshake.hello(NODE, challenge)
    hello = handshake.check_hello(verifier(), greeting.body, challenge)
    body, g_sealer, g_opener = handshake.welcome(GATEWAY, hello, challenge, 2.0)
    welcomed = handshake.check_welcome(verifier(), body, greeting, node_id=NODE.node_id, gateway_key=GATEWAY.public_key)
    assert welcomed.gateway_key == GATEWAY.public_key
    return (welcomed.sealer, welcomed.opener), (g_sealer, g_opener)


KINDS = st.sampled_from(list(Kind))


@given(st.lists(st.tuples(KINDS, st.integers(0, 2**32 - 1), st.binary(max_size=300)), min_size=1, max_size=20))
def test_frames_sealed_by_one_end_open_at_the_other_in_order(frames: list[tuple[Kind, int, bytes]]) -> None:
    (n_sealer, n_opener), (g_sealer, g_opener) = greet()
    for kind, stream, payload in frames:
        up = g_opener.open(n_sealer.seal(kind, stream, payload))
        down = n_opener.open(g_sealer.seal(kind, stream, payload))
        assert (up.kind, up.stream, up.payload) == (down.kind, down.stream, down.payload) == (kind, stream, payload)


@given(st.binary(min_size=1, max_size=200), st.data())
def test_any_altered_byte_fails_the_tag(payload: bytes, data: st.DataObject) -> None:
    (n_sealer, _), (_, g_opener) = greet()
    sealed = bytearray(n_sealer.seal(Kind.BODY, 7, payload))
    at = data.draw(st.integers(0, len(sealed) - 1))
    sealed[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(BadFrame):
        g_opener.open(bytes(sealed))


def test_a_replayed_a_dropped_or_a_reordered_frame_fails() -> None:
    (n_sealer, _), (_, g_opener) = greet()
    first = n_sealer.seal(Kind.BODY, 1, b"0")
    assert g_opener.open(first).payload == b"0"
    with pytest.raises(BadFrame):
        g_opener.open(first)  # replayed: its counter is behind
    (n_sealer, _), (_, g_opener) = greet()
    first, second = (n_sealer.seal(Kind.BODY, 1, b"%d" % i) for i in range(2))
    with pytest.raises(BadFrame):
        g_opener.open(second)  # the first one dropped (or reordered)


def test_frames_of_one_tunnel_do_not_open_on_another_nor_in_the_other_direction() -> None:
    (n_sealer, n_opener), _ = greet()
    _, (_, other_opener) = greet()
    frame = n_sealer.seal(Kind.HEAD, 3, b'{"status":200}')
    with pytest.raises(BadFrame):
        other_opener.open(frame)
    with pytest.raises(BadFrame):
        n_opener.open(frame)  # the node's own frame reflected back to it


def test_an_exchange_key_swapped_in_transit_breaks_the_hello_signature() -> None:
    """An on-path attacker who puts its own X25519 key in the hello (to read or forge the frames) breaks the node's
    signature over it."""
    challenge = handshake.challenge()
    greeting = handshake.hello(NODE, challenge)
    doc = orjson.loads(greeting.body)
    doc["payload"]["kx"] = handshake.hello(Identity.generate(), challenge).exchange.public
    with pytest.raises(BadSignature):
        handshake.check_hello(verifier(), orjson.dumps(doc), challenge)


def test_a_short_frame_is_refused() -> None:
    (_, _), (_, g_opener) = greet()
    with pytest.raises(BadFrame, match="shorter"):
        g_opener.open(b"\x16\x00\x00\x00\x01short")
