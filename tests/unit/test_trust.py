"""Tests for gridserve.trust: signed envelopes (signature, signer, purpose, freshness, replay) and identities."""

from __future__ import annotations

import base64
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gridserve.trust import (
    BadSignature,
    EnvelopeVerifier,
    Expired,
    FreshnessPolicy,
    FromTheFuture,
    Identity,
    Malformed,
    Replayed,
    TrustError,
    Unsigned,
    WrongSigner,
    load_or_create_identity,
    node_id_for,
    sign_envelope,
)

T0 = 1_700_000_000.0
PURPOSE = "heartbeat"
SIG_PARAMS = ("keyid", "alg", "purpose", "created", "expires", "nonce")


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# Identities are expensive-ish to make inside hypothesis loops; two fixed ones suffice.
ALICE = Identity.generate()
BOB = Identity.generate()
POLICY = FreshnessPolicy()


def make_verifier(t: float = T0, policy: FreshnessPolicy = POLICY) -> tuple[EnvelopeVerifier, Clock]:
    clock = Clock(t)
    return EnvelopeVerifier(policy, clock), clock


def decode(body: bytes) -> dict[str, Any]:
    doc = orjson.loads(body)
    assert isinstance(doc, dict)
    return doc


def encode(doc: Any) -> bytes:
    return orjson.dumps(doc)


def canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


# --- round trip -------------------------------------------------------------------------------------------


@given(payload=json_values, purpose=st.text(min_size=1, max_size=12), lifetime=st.floats(1.0, 120.0))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_returns_payload_and_signer(payload: Any, purpose: str, lifetime: float) -> None:
    verifier, _ = make_verifier()
    body = sign_envelope(ALICE, payload, purpose=purpose, now=T0, lifetime_s=lifetime)
    env = verifier.verify(body, purpose=purpose, expected_keyid=ALICE.public_key)
    assert canonical(env.payload) == canonical(payload)
    assert env.payload == payload
    assert env.keyid == ALICE.public_key
    assert env.purpose == purpose
    assert env.created == pytest.approx(T0, abs=1e-3)
    assert env.expires == pytest.approx(T0 + lifetime, abs=1e-3)
    assert env.nonce


def test_each_envelope_has_a_fresh_nonce() -> None:
    nonces = {decode(sign_envelope(ALICE, {"x": 1}, purpose=PURPOSE, now=T0))["sig"]["nonce"] for _ in range(50)}
    assert len(nonces) == 50


# --- tampering --------------------------------------------------------------------------------------------


@given(payload=json_values, other=json_values)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_any_payload_change_is_rejected(payload: Any, other: Any) -> None:
    assume(canonical(payload) != canonical(other))
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, payload, purpose=PURPOSE, now=T0))
    doc["payload"] = other
    with pytest.raises(BadSignature):
        verifier.verify(encode(doc), purpose=PURPOSE)
    # The untampered envelope is still accepted by the same verifier (the failed attempt burned no nonce).
    doc["payload"] = payload
    assert verifier.verify(encode(doc), purpose=PURPOSE).payload == payload


def _tamper(doc: dict[str, Any], param: str) -> None:
    sig = doc["sig"]
    if param in ("created", "expires"):
        sig[param] = sig[param] + 0.5
    elif param == "nonce":
        sig[param] = sig[param] + "x"
    elif param == "keyid":
        sig[param] = BOB.public_key
    else:  # pragma: no cover - guarded by the parametrisation
        raise AssertionError(param)


@pytest.mark.parametrize("param", ["keyid", "created", "expires", "nonce"])
def test_changing_a_signed_parameter_breaks_the_signature(param: str) -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    _tamper(doc, param)
    with pytest.raises(BadSignature):
        verifier.verify(encode(doc), purpose=PURPOSE)


def test_adding_a_parameter_breaks_the_signature() -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    doc["sig"]["extra"] = "smuggled"
    with pytest.raises(BadSignature):
        verifier.verify(encode(doc), purpose=PURPOSE)


def test_changed_purpose_is_rejected_under_both_names() -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose="heartbeat", now=T0))
    doc["sig"]["purpose"] = "register"
    # Asked for the original purpose: the claimed purpose does not match.
    with pytest.raises(WrongSigner):
        verifier.verify(encode(doc), purpose="heartbeat")
    # Asked for the new purpose: the signature does not cover it.
    with pytest.raises(BadSignature):
        verifier.verify(encode(doc), purpose="register")


def test_wrong_alg_is_malformed() -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    doc["sig"]["alg"] = "hmac-sha256"
    with pytest.raises(Malformed):
        verifier.verify(encode(doc), purpose=PURPOSE)


@pytest.mark.parametrize("param", ["created", "expires"])
@pytest.mark.parametrize("bad", ["1700000000", None, [1], {"t": 1}])
def test_non_numeric_times_are_malformed(param: str, bad: Any) -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    doc["sig"][param] = bad
    with pytest.raises(Malformed):
        verifier.verify(encode(doc), purpose=PURPOSE)


@pytest.mark.parametrize("param", SIG_PARAMS)
def test_missing_parameter_is_malformed(param: str) -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    del doc["sig"][param]
    with pytest.raises(Malformed) as info:
        verifier.verify(encode(doc), purpose=PURPOSE)
    assert param in str(info.value)


@given(data=st.data())
@settings(max_examples=100)
def test_any_signature_byte_flip_is_rejected(data: st.DataObject) -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    raw = bytearray(base64.b64decode(doc["sig"]["signature"]))
    i = data.draw(st.integers(0, len(raw) - 1), label="byte")
    mask = data.draw(st.integers(1, 255), label="mask")
    raw[i] ^= mask
    doc["sig"]["signature"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(BadSignature):
        verifier.verify(encode(doc), purpose=PURPOSE)


@pytest.mark.parametrize("signature", ["", "not base64 !!", base64.b64encode(b"short").decode(), 12345, None])
def test_garbage_signature_is_bad_signature(signature: Any) -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    doc["sig"]["signature"] = signature
    with pytest.raises(BadSignature):
        verifier.verify(encode(doc), purpose=PURPOSE)


@pytest.mark.parametrize("keyid", ["", "not a key", base64.b64encode(b"x" * 31).decode(), 42])
def test_garbage_keyid_is_bad_signature(keyid: Any) -> None:
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    doc["sig"]["keyid"] = keyid
    with pytest.raises(BadSignature):
        verifier.verify(encode(doc), purpose=PURPOSE)


def test_signature_by_another_key_is_bad_signature() -> None:
    """Bob's signature with Alice's keyid claimed."""
    verifier, _ = make_verifier()
    doc = decode(sign_envelope(BOB, {"seq": 7}, purpose=PURPOSE, now=T0))
    doc["sig"]["keyid"] = ALICE.public_key
    with pytest.raises(BadSignature):
        verifier.verify(encode(doc), purpose=PURPOSE, expected_keyid=ALICE.public_key)


# --- signer and purpose -----------------------------------------------------------------------------------


def test_expected_keyid_mismatch_is_wrong_signer() -> None:
    verifier, _ = make_verifier()
    body = sign_envelope(BOB, {"seq": 7}, purpose=PURPOSE, now=T0)
    with pytest.raises(WrongSigner):
        verifier.verify(body, purpose=PURPOSE, expected_keyid=ALICE.public_key)
    # The same body from the right signer's point of view is fine.
    assert verifier.verify(body, purpose=PURPOSE, expected_keyid=BOB.public_key).keyid == BOB.public_key


@given(signed_for=st.text(max_size=10), asked_for=st.text(max_size=10))
def test_wrong_purpose_is_rejected(signed_for: str, asked_for: str) -> None:
    assume(signed_for != asked_for)
    verifier, _ = make_verifier()
    body = sign_envelope(ALICE, {"seq": 7}, purpose=signed_for, now=T0)
    with pytest.raises(WrongSigner):
        verifier.verify(body, purpose=asked_for)


# --- shape ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"\xff\xfe", b'{"payload": 1,}'])
def test_non_json_is_malformed(body: bytes) -> None:
    verifier, _ = make_verifier()
    with pytest.raises(Malformed):
        verifier.verify(body, purpose=PURPOSE)


@pytest.mark.parametrize("doc", [[], 1, "s", None, {"sig": {}}, {"nothing": 1}])
def test_non_envelope_json_is_malformed(doc: Any) -> None:
    verifier, _ = make_verifier()
    with pytest.raises(Malformed):
        verifier.verify(encode(doc), purpose=PURPOSE)


def test_unsigned_bodies_are_unsigned() -> None:
    verifier, _ = make_verifier()
    signed = decode(sign_envelope(ALICE, {"seq": 7}, purpose=PURPOSE, now=T0))
    no_signature = {"payload": signed["payload"], "sig": {k: v for k, v in signed["sig"].items() if k != "signature"}}
    for doc in (
        {"payload": {"seq": 7}},
        {"payload": {"seq": 7}, "sig": None},
        {"payload": 1, "sig": "x"},
        no_signature,
    ):
        with pytest.raises(Unsigned):
            verifier.verify(encode(doc), purpose=PURPOSE)


def test_errors_share_a_base_with_distinct_kinds() -> None:
    kinds = {cls.kind for cls in (Malformed, Unsigned, BadSignature, WrongSigner, Expired, FromTheFuture, Replayed)}
    assert len(kinds) == 7
    assert all(issubclass(c, TrustError) for c in (Malformed, Unsigned, BadSignature, Expired, Replayed))


# --- freshness --------------------------------------------------------------------------------------------


@given(
    lifetime_ms=st.integers(1_000, 120_000),
    offset_ms=st.integers(-200_000, 400_000),
    skew_s=st.sampled_from([0.0, 5.0, 30.0, 300.0]),
)
@settings(max_examples=300)
def test_accepted_iff_inside_the_skewed_validity_window(lifetime_ms: int, offset_ms: int, skew_s: float) -> None:
    """Signed at T0 for `lifetime`; verified at T0 + offset. Accepted iff created - skew <= now <= expires + skew."""
    created, expires = T0, T0 + lifetime_ms / 1000
    now = T0 + offset_ms / 1000
    # Stay clear of the exact boundaries (timestamps are rounded to the millisecond).
    assume(abs(now - (created - skew_s)) > 0.002 and abs(now - (expires + skew_s)) > 0.002)
    verifier, _ = make_verifier(now, FreshnessPolicy(max_skew_s=skew_s, max_lifetime_s=120.0))
    body = sign_envelope(ALICE, {"n": offset_ms}, purpose=PURPOSE, now=created, lifetime_s=lifetime_ms / 1000)
    if now < created - skew_s:
        with pytest.raises(FromTheFuture):
            verifier.verify(body, purpose=PURPOSE)
    elif now > expires + skew_s:
        with pytest.raises(Expired):
            verifier.verify(body, purpose=PURPOSE)
    else:
        assert verifier.verify(body, purpose=PURPOSE).payload == {"n": offset_ms}


def test_created_too_far_in_the_future() -> None:
    verifier, _ = make_verifier(T0)
    body = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0 + POLICY.max_skew_s + 1.0)
    with pytest.raises(FromTheFuture):
        verifier.verify(body, purpose=PURPOSE)
    # A little ahead, within the skew, is fine.
    ok = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0 + POLICY.max_skew_s - 1.0)
    verifier.verify(ok, purpose=PURPOSE)


def test_expired_beyond_skew() -> None:
    verifier, clock = make_verifier(T0)
    late = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0, lifetime_s=10.0)
    clock.t = T0 + 10.0 + POLICY.max_skew_s + 1.0
    with pytest.raises(Expired):
        verifier.verify(late, purpose=PURPOSE)
    # Expired, but within the skew: accepted.
    grace = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0, lifetime_s=10.0)
    clock.t = T0 + 10.0 + POLICY.max_skew_s - 1.0
    verifier.verify(grace, purpose=PURPOSE)


@given(excess=st.floats(0.01, 10_000.0))
def test_lifetime_above_max_is_expired(excess: float) -> None:
    verifier, _ = make_verifier(T0)
    body = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0, lifetime_s=POLICY.max_lifetime_s + excess)
    with pytest.raises(Expired):
        verifier.verify(body, purpose=PURPOSE)


def test_lifetime_at_max_is_accepted() -> None:
    verifier, _ = make_verifier(T0)
    body = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0, lifetime_s=POLICY.max_lifetime_s)
    verifier.verify(body, purpose=PURPOSE)


def test_negative_lifetime_is_expired() -> None:
    verifier, _ = make_verifier(T0)
    body = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0, lifetime_s=-1.0)
    with pytest.raises(Expired):
        verifier.verify(body, purpose=PURPOSE)


# --- replay -----------------------------------------------------------------------------------------------


@given(payload=json_values)
@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
def test_identical_body_is_replayed(payload: Any) -> None:
    verifier, clock = make_verifier(T0)
    body = sign_envelope(ALICE, payload, purpose=PURPOSE, now=T0)
    verifier.verify(body, purpose=PURPOSE)
    with pytest.raises(Replayed):
        verifier.verify(body, purpose=PURPOSE)
    clock.t = T0 + 20.0  # still inside the lifetime: still a replay
    with pytest.raises(Replayed):
        verifier.verify(body, purpose=PURPOSE)


def test_reserialised_body_is_still_replayed() -> None:
    """Replay protection keys on the nonce, not on the exact bytes."""
    verifier, _ = make_verifier(T0)
    body = sign_envelope(ALICE, {"a": 1, "b": [1, 2]}, purpose=PURPOSE, now=T0)
    verifier.verify(body, purpose=PURPOSE)
    reordered = orjson.dumps(decode(body), option=orjson.OPT_INDENT_2)
    assert reordered != body
    with pytest.raises(Replayed):
        verifier.verify(reordered, purpose=PURPOSE)


def test_rejected_messages_do_not_burn_the_nonce() -> None:
    verifier, _ = make_verifier(T0)
    body = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0)
    with pytest.raises(WrongSigner):
        verifier.verify(body, purpose="register")
    verifier.verify(body, purpose=PURPOSE)


def test_nonce_cache_forgets_after_expiry() -> None:
    verifier, clock = make_verifier(T0)
    n = 40
    for i in range(n):
        verifier.verify(sign_envelope(ALICE, {"i": i}, purpose=PURPOSE, now=T0, lifetime_s=10.0), purpose=PURPOSE)
    assert len(verifier.nonces) == n
    # Past every envelope's expiry + skew (and the sweep interval): a new message sweeps the old nonces out.
    clock.t = T0 + 10.0 + POLICY.max_skew_s + 60.0
    verifier.verify(sign_envelope(ALICE, {"new": True}, purpose=PURPOSE, now=clock.t), purpose=PURPOSE)
    assert len(verifier.nonces) == 1


def test_nonce_cache_stays_bounded_under_steady_traffic() -> None:
    """One message a second with a 10 s lifetime: the cache holds about (lifetime + skew + sweep) entries."""
    verifier, clock = make_verifier(T0)
    lifetime = 10.0
    sizes = []
    for i in range(600):
        clock.t = T0 + i
        verifier.verify(
            sign_envelope(ALICE, {"i": i}, purpose=PURPOSE, now=clock.t, lifetime_s=lifetime), purpose=PURPOSE
        )
        sizes.append(len(verifier.nonces))
    bound = lifetime + POLICY.max_skew_s + 5.0 + 2
    assert max(sizes) <= bound
    assert max(sizes[-100:]) <= bound


def test_nonce_is_remembered_while_message_is_still_acceptable() -> None:
    """Just inside expires + skew, the nonce must still be known even after several sweeps."""
    verifier, clock = make_verifier(T0)
    body = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0, lifetime_s=10.0)
    verifier.verify(body, purpose=PURPOSE)
    for dt in range(0, 40, 6):  # other traffic triggers sweeps
        clock.t = T0 + dt
        verifier.verify(sign_envelope(BOB, {"dt": dt}, purpose=PURPOSE, now=clock.t), purpose=PURPOSE)
    clock.t = T0 + 10.0 + POLICY.max_skew_s - 0.001
    with pytest.raises(Replayed):
        verifier.verify(body, purpose=PURPOSE)


def test_replay_at_exact_forget_instant_is_rejected() -> None:
    verifier, clock = make_verifier(T0)
    body = sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0, lifetime_s=30.0)
    verifier.verify(body, purpose=PURPOSE)
    clock.t = T0 + 30.0 + POLICY.max_skew_s  # == expires + skew: still passes the freshness check
    with pytest.raises(Replayed):
        verifier.verify(body, purpose=PURPOSE)


def test_replays_are_per_signer() -> None:
    """Nonces are keyed by (keyid, nonce): one signer cannot block another by reusing a nonce string."""
    verifier, _ = make_verifier(T0)
    a = decode(sign_envelope(ALICE, {}, purpose=PURPOSE, now=T0))
    verifier.verify(encode(a), purpose=PURPOSE)
    b = decode(sign_envelope(BOB, {}, purpose=PURPOSE, now=T0))
    assert b["sig"]["nonce"] != a["sig"]["nonce"]
    verifier.verify(encode(b), purpose=PURPOSE)
    assert len(verifier.nonces) == 2


# --- identity ---------------------------------------------------------------------------------------------


def test_node_id_is_deterministic_and_per_key() -> None:
    ids = [Identity.generate() for _ in range(20)]
    node_ids = [node_id_for(i.public_key) for i in ids]
    assert node_ids == [node_id_for(i.public_key) for i in ids]
    assert len(set(node_ids)) == len(ids)
    for ident, nid in zip(ids, node_ids, strict=True):
        assert ident.node_id == nid
        assert nid.startswith("n") and len(nid) == 41
        int(nid[1:], 16)


def test_identity_signature_verifies_only_for_its_own_key() -> None:
    verifier, _ = make_verifier(T0)
    body = sign_envelope(ALICE, {"x": 1}, purpose=PURPOSE, now=T0)
    assert verifier.verify(body, purpose=PURPOSE).keyid == ALICE.public_key
    assert ALICE.public_key != BOB.public_key


def test_load_or_create_identity_creates_private_file_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "node.key"
    created = load_or_create_identity(path)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reloaded = load_or_create_identity(path)
    assert reloaded.public_key == created.public_key
    assert reloaded.node_id == created.node_id
    # The reloaded key signs envelopes the original key's id verifies.
    verifier, _ = make_verifier(T0)
    body = sign_envelope(reloaded, {"x": 1}, purpose=PURPOSE, now=T0)
    assert verifier.verify(body, purpose=PURPOSE, expected_keyid=created.public_key).payload == {"x": 1}


def test_load_or_create_identity_is_per_path(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "a.key")
    b = load_or_create_identity(tmp_path / "b.key")
    assert a.public_key != b.public_key
    assert (tmp_path / "a.key").read_bytes() != (tmp_path / "b.key").read_bytes()
    assert load_or_create_identity(tmp_path / "a.key").public_key == a.public_key
