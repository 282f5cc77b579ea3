"""The tunnel's frames (tunnel/wire.py) and its signed greeting (tunnel/handshake.py), without sockets.

A frame is `kind | stream | payload` and decodes back to what was encoded, whatever the payload; any other bytes
are refused as BadFrame and nothing else. The greeting is refused when the hello answers another connection's
challenge, is replayed, names a node other than its key, or has gone stale; the welcome is refused when another key
signed it than the one the node pinned, or it answers another hello; once through it, both ends share the channel
(its own tests are in test_tunnel_channel.py).
"""

import base64
import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridserve.trust import (
    EnvelopeVerifier,
    Expired,
    FreshnessPolicy,
    Identity,
    Malformed,
    Replayed,
    WrongSigner,
    sign_envelope,
)
from gridserve.tunnel import handshake
from gridserve.tunnel.channel import Ephemeral
from gridserve.tunnel.handshake import WrongChallenge
from gridserve.tunnel.wire import (
    CONTROL,
    HEADER,
    BadFrame,
    Frame,
    Kind,
    decode,
    encode,
    endpoint_for,
    is_tunnel,
    request_payload,
    split_request,
    websocket_url,
)

NODE = Identity.generate()
GATEWAY = Identity.generate()
STREAMS = st.integers(min_value=0, max_value=0xFFFFFFFF)
KNOWN_KINDS = {int(k) for k in Kind}


def _verifier(clock: float | None = None) -> EnvelopeVerifier:
    return EnvelopeVerifier(FreshnessPolicy(), time.time if clock is None else lambda: clock)


# -- frames -------------------------------------------------------------------------------------------------------
def test_a_frame_is_its_kind_byte_its_big_endian_stream_and_its_payload() -> None:
    assert HEADER.size == 5
    assert encode(Kind.REQUEST, 0x01020304, b"hi") == b"\x03\x01\x02\x03\x04hi"
    assert encode(Kind.WS_CLOSE, CONTROL) == b"\x29\x00\x00\x00\x00"
    assert decode(b"\x17\x00\x00\x01\x00end") == Frame(Kind.END, 256, b"end")


@given(kind=st.sampled_from(Kind), stream=STREAMS, payload=st.binary(max_size=512))
def test_every_frame_decodes_to_what_was_encoded(kind: Kind, stream: int, payload: bytes) -> None:
    frame = decode(encode(kind, stream, payload))
    assert frame == Frame(kind, stream, payload)
    assert type(frame.kind) is Kind


@given(data=st.binary(max_size=64))
def test_any_bytes_decode_to_a_frame_that_encodes_back_or_are_a_bad_frame(data: bytes) -> None:
    try:
        frame = decode(data)
    except BadFrame:
        assert len(data) < HEADER.size or data[0] not in KNOWN_KINDS
        return
    assert data[0] in KNOWN_KINDS
    assert encode(frame.kind, frame.stream, frame.payload) == data


@pytest.mark.parametrize("data", [b"", b"\x03", b"\x03\x00\x00\x00"])
def test_bytes_shorter_than_the_header_are_a_bad_frame(data: bytes) -> None:
    with pytest.raises(BadFrame, match=f"a frame of {len(data)} bytes is shorter than its header"):
        decode(data)


@pytest.mark.parametrize("kind", [0, 7, 19, 27, 39, 42, 255])
def test_an_unknown_kind_is_a_bad_frame(kind: int) -> None:
    with pytest.raises(BadFrame, match=f"unknown frame kind {kind}$"):
        decode(bytes([kind]) + b"\x00\x00\x00\x01payload")


def test_a_bad_frame_is_a_value_error_for_callers_that_catch_those() -> None:
    assert issubclass(BadFrame, ValueError)


# -- HTTP requests inside frames ----------------------------------------------------------------------------------
TEXT = st.text(max_size=40)


@given(
    method=st.text(min_size=1, max_size=10),
    path=TEXT,
    headers=st.dictionaries(TEXT, TEXT, max_size=5),
    body=st.binary(max_size=256),
)
def test_a_request_splits_back_into_its_head_and_body(
    method: str, path: str, headers: dict[str, str], body: bytes
) -> None:
    meta, rest = split_request(request_payload(method, path, headers, body))
    assert meta == {"method": method, "path": path, "headers": headers}
    assert rest == body  # newlines in the head's strings or in the body do not move the cut


def test_a_request_payload_is_a_json_head_a_newline_and_the_raw_body() -> None:
    payload = request_payload("POST", "/internal/generate", {"content-type": "application/json"}, b'{"a":1}\n\n')
    assert payload == (
        b'{"method":"POST","path":"/internal/generate","headers":{"content-type":"application/json"}}\n{"a":1}\n\n'
    )


def test_a_request_without_a_newline_has_no_head() -> None:
    with pytest.raises(BadFrame, match="a request without its head"):
        split_request(b'{"method":"GET","path":"/health","headers":{}}')


@pytest.mark.parametrize(
    "head",
    [
        b'{"path":"/health"}',
        b'{"method":"GET"}',
        b'{"method":1,"path":"/health"}',
        b'{"method":"GET","path":null}',
        b'["GET","/health"]',
        b'"GET /health"',
    ],
)
def test_a_request_head_needs_a_method_and_a_path(head: bytes) -> None:
    with pytest.raises(BadFrame, match="a request head needs a method and a path"):
        split_request(head + b"\nbody")


def test_a_request_head_that_is_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):  # orjson's JSONDecodeError: the node answers 400 for both (node/tunnel.py)
        split_request(b"GET /health\n")


# -- addresses ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gateway", "url"),
    [
        ("http://gw.test:8080", "ws://gw.test:8080/nodes/tunnel"),
        ("https://gw.test", "wss://gw.test/nodes/tunnel"),
        ("https://gw.test/", "wss://gw.test/nodes/tunnel"),
        ("http://127.0.0.1:9000/", "ws://127.0.0.1:9000/nodes/tunnel"),
    ],
)
def test_the_tunnel_url_follows_the_gateway_scheme(gateway: str, url: str) -> None:
    assert websocket_url(gateway) == url


def test_a_tunnel_endpoint_names_the_node() -> None:
    endpoint = endpoint_for(NODE.node_id)
    assert endpoint == f"tunnel://{NODE.node_id}"
    assert is_tunnel(endpoint)
    assert not is_tunnel("http://10.0.0.7:9000")
    assert not is_tunnel("https://tunnel.example")


# -- the greeting -------------------------------------------------------------------------------------------------
KX = base64.b64encode(bytes(range(32))).decode()
"""An exchange key of the right shape, for hand-made greetings."""


def test_a_hello_answering_this_challenge_names_the_node_its_keys_and_its_nonce() -> None:
    challenge = handshake.challenge()
    greeting = handshake.hello(NODE, challenge)
    greeted = handshake.check_hello(_verifier(), greeting.body, challenge)
    assert greeted == handshake.Hello(NODE.node_id, NODE.public_key, greeting.nonce, greeting.exchange.public)
    assert greeting.challenge == challenge
    assert len(greeting.nonce) >= 32
    assert len(base64.b64decode(greeted.exchange_key)) == 32


def test_challenges_nonces_and_exchange_keys_are_fresh_each_time() -> None:
    assert handshake.challenge() != handshake.challenge()
    challenge = handshake.challenge()
    one, two = handshake.hello(NODE, challenge), handshake.hello(NODE, challenge)
    assert one.nonce != two.nonce
    assert one.exchange.public != two.exchange.public


def test_a_hello_answering_another_connections_challenge_is_refused() -> None:
    greeting = handshake.hello(NODE, handshake.challenge())
    with pytest.raises(WrongChallenge, match="does not answer this connection's challenge") as caught:
        handshake.check_hello(_verifier(), greeting.body, handshake.challenge())
    assert caught.value.kind == "wrong_challenge"


def test_a_hello_replayed_into_the_same_gateway_is_refused() -> None:
    verifier = _verifier()
    challenge = handshake.challenge()
    greeting = handshake.hello(NODE, challenge)
    handshake.check_hello(verifier, greeting.body, challenge)
    with pytest.raises(Replayed):
        handshake.check_hello(verifier, greeting.body, challenge)


def test_a_hello_naming_a_node_other_than_its_signing_key_is_refused() -> None:
    other = Identity.generate()
    challenge = handshake.challenge()
    payload = {"node_id": other.node_id, "challenge": challenge, "nonce": "n" * 32, "kx": KX}
    body = sign_envelope(NODE, payload, purpose=handshake.HELLO, now=time.time())
    with pytest.raises(WrongSigner, match="names a node other than the key that signed it"):
        handshake.check_hello(_verifier(), body, challenge)


@pytest.mark.parametrize(("nonce", "kx"), [(None, KX), ("", KX), (42, KX), ("n" * 32, None), ("n" * 32, 7)], ids=str)
def test_a_hello_without_a_nonce_or_an_exchange_key_is_refused(nonce: object, kx: object) -> None:
    challenge = handshake.challenge()
    payload = {"node_id": NODE.node_id, "challenge": challenge, "nonce": nonce, "kx": kx}
    body = sign_envelope(NODE, payload, purpose=handshake.HELLO, now=time.time())
    with pytest.raises(Malformed, match="carries no nonce or no exchange key"):
        handshake.check_hello(_verifier(), body, challenge)


def test_a_welcome_cannot_pass_for_a_hello() -> None:
    challenge = handshake.challenge()
    payload = {"node_id": NODE.node_id, "challenge": challenge, "nonce": "n" * 32, "kx": KX}
    body = sign_envelope(NODE, payload, purpose=handshake.WELCOME, now=time.time())
    with pytest.raises(WrongSigner, match="tunnel-welcome"):
        handshake.check_hello(_verifier(), body, challenge)


def test_a_stale_hello_is_refused() -> None:
    challenge = handshake.challenge()
    greeting = handshake.hello(NODE, challenge)
    with pytest.raises(Expired):
        handshake.check_hello(_verifier(clock=time.time() + 3600), greeting.body, challenge)


def _greeted() -> tuple[handshake.NodeGreeting, handshake.Hello]:
    """The node's greeting, and the hello as the gateway checked it."""
    challenge = handshake.challenge()
    greeting = handshake.hello(NODE, challenge)
    return greeting, handshake.check_hello(_verifier(), greeting.body, challenge)


def test_a_welcome_from_the_pinned_gateway_key_checks_out_and_both_ends_share_the_channel() -> None:
    greeting, greeted = _greeted()
    body, g_sealer, g_opener = handshake.welcome(GATEWAY, greeted, greeting.challenge, 2.5)
    welcomed = handshake.check_welcome(
        _verifier(), body, greeting, node_id=NODE.node_id, gateway_key=GATEWAY.public_key
    )
    assert welcomed.gateway_key == GATEWAY.public_key
    payload = orjson.loads(body)["payload"]
    assert {k: v for k, v in payload.items() if k != "kx"} == {
        "node_id": NODE.node_id,
        "nonce": greeting.nonce,
        "heartbeat_interval_s": 2.5,
        "beats": "channel",
    }
    assert welcomed.channel_beats
    assert welcomed.opener.open(g_sealer.seal(Kind.REQUEST, 3, b"to the node")) == Frame(
        Kind.REQUEST, 3, b"to the node"
    )
    assert g_opener.open(welcomed.sealer.seal(Kind.END, 3, b"to the gateway")) == Frame(Kind.END, 3, b"to the gateway")


def test_a_node_that_knows_no_gateway_key_learns_the_welcomes() -> None:
    greeting, greeted = _greeted()
    body, _, _ = handshake.welcome(GATEWAY, greeted, greeting.challenge, 1.0)
    welcomed = handshake.check_welcome(_verifier(), body, greeting, node_id=NODE.node_id, gateway_key=None)
    assert welcomed.gateway_key == GATEWAY.public_key


def test_a_welcome_that_does_not_say_it_takes_channel_beats_gets_signed_heartbeats() -> None:
    """An older gateway's welcome (no `beats`), or one naming something else: the node signs its heartbeats."""
    for extra in ({}, {"beats": "signed"}):
        greeting, _ = _greeted()
        ephemeral = Ephemeral()
        payload = {
            "node_id": NODE.node_id,
            "nonce": greeting.nonce,
            "kx": ephemeral.public,
            "heartbeat_interval_s": 1.0,
        }
        body = sign_envelope(GATEWAY, payload | extra, purpose=handshake.WELCOME, now=time.time())
        welcomed = handshake.check_welcome(_verifier(), body, greeting, node_id=NODE.node_id, gateway_key=None)
        assert not welcomed.channel_beats


def test_a_welcome_signed_by_another_key_than_the_pinned_one_is_refused() -> None:
    greeting, greeted = _greeted()
    body, _, _ = handshake.welcome(Identity.generate(), greeted, greeting.challenge, 1.0)
    with pytest.raises(WrongSigner, match="not allowed to send this message"):
        handshake.check_welcome(_verifier(), body, greeting, node_id=NODE.node_id, gateway_key=GATEWAY.public_key)


def test_a_welcome_for_another_hello_is_refused() -> None:
    greeting, greeted = _greeted()
    other, _ = _greeted()
    body, _, _ = handshake.welcome(GATEWAY, greeted, greeting.challenge, 1.0)
    with pytest.raises(WrongChallenge, match="does not answer this node's hello"):
        handshake.check_welcome(_verifier(), body, other, node_id=NODE.node_id, gateway_key=GATEWAY.public_key)


def test_a_welcome_for_another_node_is_refused() -> None:
    greeting, greeted = _greeted()
    body, _, _ = handshake.welcome(GATEWAY, greeted, greeting.challenge, 1.0)
    other = Identity.generate()
    with pytest.raises(WrongChallenge):
        handshake.check_welcome(_verifier(), body, greeting, node_id=other.node_id, gateway_key=GATEWAY.public_key)


def test_a_welcome_replayed_to_the_same_node_is_refused() -> None:
    verifier = _verifier()
    greeting, greeted = _greeted()
    body, _, _ = handshake.welcome(GATEWAY, greeted, greeting.challenge, 1.0)
    handshake.check_welcome(verifier, body, greeting, node_id=NODE.node_id, gateway_key=GATEWAY.public_key)
    with pytest.raises(Replayed):
        handshake.check_welcome(verifier, body, greeting, node_id=NODE.node_id, gateway_key=GATEWAY.public_key)


def test_a_hello_cannot_pass_for_a_welcome() -> None:
    greeting, _ = _greeted()
    payload = {"node_id": NODE.node_id, "nonce": greeting.nonce, "kx": KX, "heartbeat_interval_s": 1.0}
    body = sign_envelope(GATEWAY, payload, purpose=handshake.HELLO, now=time.time())
    with pytest.raises(WrongSigner, match="tunnel-hello"):
        handshake.check_welcome(_verifier(), body, greeting, node_id=NODE.node_id, gateway_key=None)


def test_a_welcome_without_an_exchange_key_is_refused() -> None:
    greeting, _ = _greeted()
    payload = {"node_id": NODE.node_id, "nonce": greeting.nonce, "heartbeat_interval_s": 1.0}
    body = sign_envelope(GATEWAY, payload, purpose=handshake.WELCOME, now=time.time())
    with pytest.raises(Malformed, match="carries no exchange key"):
        handshake.check_welcome(_verifier(), body, greeting, node_id=NODE.node_id, gateway_key=GATEWAY.public_key)


@pytest.mark.parametrize("kx", ["not base64!", base64.b64encode(b"short").decode()], ids=["not base64", "short"])
def test_a_welcome_whose_exchange_key_is_not_a_key_is_a_bad_frame(kx: str) -> None:
    greeting, _ = _greeted()
    payload = {"node_id": NODE.node_id, "nonce": greeting.nonce, "kx": kx, "heartbeat_interval_s": 1.0}
    body = sign_envelope(GATEWAY, payload, purpose=handshake.WELCOME, now=time.time())
    with pytest.raises(BadFrame, match="exchange key"):
        handshake.check_welcome(_verifier(), body, greeting, node_id=NODE.node_id, gateway_key=GATEWAY.public_key)


@pytest.mark.parametrize("point", [bytes(32), b"\x01" + bytes(31)], ids=["zero", "one"])
def test_a_welcome_whose_exchange_key_makes_no_secret_is_a_bad_frame(point: bytes) -> None:
    greeting, _ = _greeted()
    low = base64.b64encode(point).decode()  # a low-order point: X25519 with it gives all zeros
    payload = {"node_id": NODE.node_id, "nonce": greeting.nonce, "kx": low, "heartbeat_interval_s": 1.0}
    body = sign_envelope(GATEWAY, payload, purpose=handshake.WELCOME, now=time.time())
    with pytest.raises(BadFrame, match="makes no shared secret"):
        handshake.check_welcome(_verifier(), body, greeting, node_id=NODE.node_id, gateway_key=GATEWAY.public_key)
