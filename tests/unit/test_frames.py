"""Signed binary activation frames (trust/frames.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gridserve.trust import Identity
from gridserve.trust.errors import BadSignature, Expired, FromTheFuture, Malformed, Replayed, WrongSigner
from gridserve.trust.frames import Frame, FrameReader, encode, from_bfloat16_bits, to_bfloat16_bits

GATEWAY, NODE, OTHER = Identity.generate(), Identity.generate(), Identity.generate()


def reader() -> FrameReader:
    return FrameReader(me=NODE.public_key, sender=GATEWAY.public_key)


FLOATS = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
    elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False),
)


@given(array=FLOATS)
@settings(max_examples=100, deadline=None)
def test_float32_frames_arrive_bit_for_bit(array: np.ndarray) -> None:
    data = encode(GATEWAY, Frame("step", "s1", 3, {"k": 1}, array), to=NODE.public_key, seq=1)
    frame, size = reader().decode(data)
    assert frame.kind == "step" and frame.session == "s1" and frame.step == 3 and frame.meta == {"k": 1}
    assert frame.array is not None and frame.array.dtype == np.float32 and frame.array.shape == array.shape
    assert frame.array.tobytes() == array.tobytes() and size == array.nbytes


@given(array=FLOATS)
@settings(max_examples=100, deadline=None)
def test_bfloat16_frames_halve_the_bytes_and_round_to_nearest(array: np.ndarray) -> None:
    data = encode(GATEWAY, Frame("step", array=array), to=NODE.public_key, seq=1, wire_dtype="bfloat16")
    frame, size = reader().decode(data)
    assert size == array.size * 2
    assert frame.array is not None and frame.array.dtype == np.float32
    # bfloat16 keeps 8 significant bits: the relative error of round-to-nearest is at most 2^-9
    err = np.abs(frame.array.astype(np.float64) - array.astype(np.float64))
    assert np.all(err <= np.abs(array.astype(np.float64)) * 2.0**-8 + 1e-38)
    assert np.array_equal(from_bfloat16_bits(to_bfloat16_bits(frame.array)), frame.array)  # already representable


def test_token_ids_and_bare_frames() -> None:
    ids = np.array([[1, 2, 262143]], dtype=np.int64)
    frame, _ = reader().decode(encode(GATEWAY, Frame("step", array=ids), to=NODE.public_key, seq=1))
    assert frame.array is not None and frame.array.dtype == np.int64 and frame.array.tolist() == [[1, 2, 262143]]
    bare, size = reader().decode(encode(GATEWAY, Frame("open", "s"), to=NODE.public_key, seq=1))
    assert bare.array is None and size == 0


def test_a_tampered_payload_or_header_fails_the_signature() -> None:
    data = bytearray(encode(GATEWAY, Frame("step", array=np.ones(8, np.float32)), to=NODE.public_key, seq=1))
    payload_at = len(data) - 64 - 32
    for where in (payload_at, 20):  # a payload byte; a header byte
        bad = bytearray(data)
        bad[where] ^= 0x01
        with pytest.raises((BadSignature, Malformed)):
            reader().decode(bytes(bad))


def test_wrong_sender_recipient_order_and_age_are_refused() -> None:
    array = np.zeros(2, np.float32)
    with pytest.raises(WrongSigner):  # signed by a key that may not send here
        reader().decode(encode(OTHER, Frame("step", array=array), to=NODE.public_key, seq=1))
    with pytest.raises(WrongSigner):  # addressed to another node
        reader().decode(encode(GATEWAY, Frame("step", array=array), to=OTHER.public_key, seq=1))
    r = reader()
    first = encode(GATEWAY, Frame("step", array=array), to=NODE.public_key, seq=5)
    r.decode(first)
    with pytest.raises(Replayed):  # the same frame again
        r.decode(first)
    with pytest.raises(Replayed):  # an older sequence number
        r.decode(encode(GATEWAY, Frame("step", array=array), to=NODE.public_key, seq=4))
    stale = FrameReader(me=NODE.public_key, sender=GATEWAY.public_key, max_skew_s=-1.0)
    with pytest.raises((Expired, FromTheFuture)):
        stale.decode(encode(GATEWAY, Frame("step"), to=NODE.public_key, seq=1))


def test_garbage_is_malformed_not_a_crash() -> None:
    for junk in (b"", b"GSF1", b"XXXX" + bytes(100), b"GSF1" + (10**6).to_bytes(4, "little") + bytes(80)):
        with pytest.raises(Malformed):
            reader().decode(junk)
    data = encode(GATEWAY, Frame("step", array=np.ones((2, 3), np.float32)), to=NODE.public_key, seq=1)
    with pytest.raises((Malformed, BadSignature)):  # payload cut short
        reader().decode(data[:-70] + data[-64:])
