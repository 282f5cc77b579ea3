"""Hypothesis-generated node protocol messages (issue 8 item 5): every malformed registration or heartbeat is
refused with a `TrustError` (never another exception) and changes nothing; valid ones are still accepted, and so
are ones with members this version does not know (a newer node's), read without them.

Unit level: `Membership` with the real verifier over an in-memory store (only the clock is injected). HTTP level
(fewer examples): a running gateway answers every malformed body with a 4xx and `{"error": {"type", "message"}}`
and keeps its live nodes; a node's signed internal endpoints answer the same way.
tests/test_protocol_attacks.py has the hand-written attacks; these generate them.
"""

import base64
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from tests.conftest import admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.membership import Membership, UnknownNode
from gridserve.store import Store, StoreWriter
from gridserve.trust import (
    BadSignature,
    EnvelopeVerifier,
    Expired,
    FreshnessPolicy,
    FromTheFuture,
    Identity,
    Replayed,
    TrustError,
    WrongSigner,
    load_or_create_identity,
)
from gridserve.trust.attestation import builtin_digests
from gridserve.trust.envelope import canonical
from gridserve.types import (
    Capability,
    GpuInfo,
    HardwareInfo,
    LayerRange,
    ModelOffer,
    NodeError,
    NodeId,
    RuntimeInfo,
    Telemetry,
)

NOW = 1_800_000_000.0
CONFIG = GatewayConfig(allow_emulated=True, allow_unlisted_models=True)
"""(The wire's bounds and types are under test here, not the grid's namespace: test_namespace.py.)"""
UNIT = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HTTP = settings(UNIT, max_examples=8)
"""Per kind of malformed message."""
OVER_LONG = 10_000
"""Characters (or items) beyond any bound a wire field allows."""
NONCES = itertools.count()

# -- messages ------------------------------------------------------------------------------------------------


def identity_from(seed: bytes) -> Identity:
    return Identity(SigningKey(seed))


def envelope(
    signer: Identity,
    payload: Any,
    *,
    purpose: str,
    created: float = NOW,
    lifetime_s: float = 30.0,
    override: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A signed envelope as `sign_envelope` makes one, but with any parameter (of any type) the test wants."""
    sig = {
        "keyid": signer.public_key,
        "alg": "ed25519",
        "purpose": purpose,
        "created": created,
        "expires": created + lifetime_s,
        "nonce": f"fuzz-{next(NONCES)}",
        **(override or {}),
    }
    return {
        "payload": payload,
        "sig": {**sig, "signature": signer.sign(canonical({"payload": payload, "params": sig}))},
    }


def body(doc: Any) -> bytes:
    return orjson.dumps(doc)


def base_capability(identity: Identity) -> Capability:
    return Capability(
        node_id=NodeId(identity.node_id),
        public_key=identity.public_key,
        endpoint="http://127.0.0.1:9",
        engine="tiny",
        models=(ModelOffer(name="fuzz-model"),),
        hardware=HardwareInfo(accelerator="cpu"),
        runtime=RuntimeInfo(gridserve="0", python="3.11", engine="tiny"),
    )


def register_payload(identity: Identity, capability: Capability | None = None) -> dict[str, Any]:
    return {"capability": (capability or base_capability(identity)).model_dump(mode="json")}


def heartbeat_payload(identity: Identity, seq: int, telemetry: Telemetry | None = None) -> dict[str, Any]:
    return {"node_id": identity.node_id, "seq": seq, "telemetry": (telemetry or Telemetry()).model_dump(mode="json")}


# -- strategies: valid values ----------------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=24)
name = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
count = st.integers(0, 2**40)
share = st.floats(0.0, 1.0)
seeds = st.binary(min_size=32, max_size=32)

ATTESTED = builtin_digests(emulated=True)
"""Models whose weights digest the gateway checks (any other digest is refused: an `UnattestedWeights`)."""


@st.composite
def valid_offers(draw: st.DrawFn) -> ModelOffer:
    model = draw(name | st.sampled_from(sorted(ATTESTED)))
    digest = draw(st.sampled_from(sorted(ATTESTED[model])) if model in ATTESTED else text)
    layers = st.builds(lambda a, n: LayerRange(start=a, end=a + n), st.integers(0, 100), st.integers(1, 100))
    return ModelOffer(
        name=model,
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16", "fp8"])),
        quantization=draw(st.sampled_from(["none", "q4_k_m", "q8_0"])),
        max_context=draw(st.integers(1, 2**20)),
        weights_digest=digest,
        layers=draw(st.none() | layers),
    )


valid_hardware = st.builds(
    HardwareInfo,
    accelerator=name,
    emulated=st.booleans(),
    cpu_model=text,
    cpu_cores=st.integers(0, 1024),
    ram_bytes=count,
    gpus=st.lists(st.builds(GpuInfo, name=name, memory_total_bytes=count, driver=text), max_size=4).map(tuple),
    memory_bytes=count,
)
valid_errors = st.builds(
    NodeError,
    at=st.floats(0.0, 2e9),
    kind=st.sampled_from(["oom", "cuda", "timeout", "refused", "engine"]),
    message=st.text(max_size=300),
)
valid_telemetry = st.builds(
    Telemetry,
    utilization=share,
    memory_used_bytes=count,
    memory_total_bytes=count,
    temperature_c=st.none() | st.floats(-40.0, 130.0),
    clock_ratio=st.none() | st.floats(0.0, 1.5),
    queue_depth=st.integers(0, 10_000),
    active_requests=st.integers(0, 10_000),
    tokens_per_s=st.floats(0.0, 1e5),
    errors=st.lists(valid_errors, max_size=10).map(tuple),
    faults=st.lists(name, max_size=8).map(tuple),
)


@st.composite
def valid_capabilities(draw: st.DrawFn, identity: Identity) -> Capability:
    return base_capability(identity).model_copy(
        update={
            "endpoint": "http://" + draw(st.from_regex(r"[a-z0-9.-]{1,40}", fullmatch=True)) + ":8000",
            "engine": draw(name),
            "models": tuple(draw(st.lists(valid_offers(), min_size=1, max_size=4))),
            "hardware": draw(valid_hardware),
            "price_per_mtok": draw(st.floats(0.0, 1e4)),
            "loadable_models": tuple(draw(st.lists(name, max_size=4))),
        }
    )


# -- strategies: invalid values --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
over_long = st.integers(OVER_LONG, OVER_LONG + 100).map(lambda n: "x" * n)
not_str = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.lists(text, max_size=2)
)
not_int = st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)
present_not_number = (
    st.booleans() | st.text(min_size=1, max_size=5) | st.lists(st.integers(0, 9), min_size=1, max_size=2)
)
not_number = st.none() | present_not_number
bad_str = over_long | not_str
bad_count = st.integers(-(2**63), -1) | not_int
bad_rate = st.floats(max_value=-1e-9, allow_infinity=False) | not_number
bad_share = bad_rate | st.floats(min_value=1.0 + 1e-9, allow_infinity=False)
bad_layers = st.builds(lambda a, b: {"start": a, "end": b}, st.integers(-100, 100), st.integers(-100, 100)).filter(
    lambda r: r["start"] < 0 or r["end"] <= r["start"]
)
too_many_names = st.integers(OVER_LONG, OVER_LONG + 10).map(lambda n: [f"m{i}" for i in range(n)])
bad_errors = st.one_of(
    st.just([{"at": NOW, "kind": "gremlins", "message": "x"}]),
    over_long.map(lambda m: [{"at": NOW, "kind": "oom", "message": m}]),
    not_number.map(lambda at: [{"at": at, "kind": "oom", "message": "x"}]),
    st.integers(OVER_LONG, OVER_LONG + 10).map(lambda n: [{"at": NOW, "kind": "oom", "message": "x"}] * n),
    not_str.filter(lambda v: not isinstance(v, list)),
)
BAD_CAPABILITY: dict[tuple[str | int, ...], st.SearchStrategy[Any]] = {
    ("endpoint",): bad_str,
    ("engine",): bad_str,
    ("public_key",): bad_str,
    ("price_per_mtok",): bad_rate,
    ("models",): not_str.filter(lambda v: not isinstance(v, list)) | too_many_names,
    ("models", 0, "name"): bad_str,
    ("models", 0, "dtype"): bad_str,
    ("models", 0, "max_context"): st.integers(-(2**63), 0) | not_int,
    ("models", 0, "layers"): bad_layers,
    ("hardware", "accelerator"): bad_str,
    ("hardware", "memory_bytes"): bad_count,
    ("hardware", "ram_bytes"): bad_count,
    ("hardware", "cpu_cores"): bad_count,
    ("hardware", "gpus"): bad_count.map(lambda m: [{"name": "g", "memory_total_bytes": m}]),
    ("runtime", "versions"): over_long.map(lambda v: {"torch": v}),
    ("loadable_models",): too_many_names | over_long.map(lambda v: [v]),
}
BAD_HEARTBEAT: dict[tuple[str | int, ...], st.SearchStrategy[Any]] = {
    ("seq",): not_int,
    ("node_id",): bad_str,
    ("telemetry", "utilization"): bad_share,
    ("telemetry", "memory_used_bytes"): bad_count,
    ("telemetry", "memory_total_bytes"): bad_count,
    ("telemetry", "queue_depth"): bad_count,
    ("telemetry", "active_requests"): bad_count,
    ("telemetry", "tokens_per_s"): bad_rate,
    ("telemetry", "clock_ratio"): st.floats(max_value=-1e-9, allow_infinity=False) | present_not_number,
    ("telemetry", "temperature_c"): st.floats(max_value=-273.16, allow_infinity=False) | present_not_number,
    ("telemetry", "errors"): bad_errors,
    ("telemetry", "faults"): too_many_names | over_long.map(lambda v: [v]) | st.just([1]),
}
SURPLUS_AT: dict[str, list[tuple[str | int, ...]]] = {
    "register": [
        ("capability",),
        ("capability", "hardware"),
        ("capability", "models", 0),
        ("capability", "runtime"),
        (),
    ],
    "heartbeat": [("telemetry",), ()],
}
"""Objects of a node's self-description where a newer node may add a member this version does not know."""
BEYOND_U64 = "18446744073709551616"
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", BEYOND_U64, "-9223372036854775809"]
"""Numbers no wire field accepts: not JSON, beyond a double, or beyond 64-bit integers (parsed as doubles)."""
FLOATS = {
    ("price_per_mtok",),
    *(("telemetry", k) for k in ("utilization", "tokens_per_s", "clock_ratio", "temperature_c")),
}
"""Number fields in which a big double is a number like another (all but BEYOND_U64 are refused there)."""


SIGNED_PARAMS = ["keyid", "alg", "purpose", "nonce", "created", "expires"]


def wrong_types(honest: Any) -> st.SearchStrategy[Any]:
    """Values of another type than `honest`: itself wrapped in a list or an object (whose text still holds it), or
    any other JSON type."""
    others = not_str if isinstance(honest, str) else not_number
    return (st.sampled_from([[honest], {"v": honest}]) | others).filter(lambda v: canonical(v) != canonical(honest))


def put(doc: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """A copy of `doc` with the value at `path` replaced (or added)."""
    copy = orjson.loads(orjson.dumps(doc))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def with_raw_number(
    signer: Identity, payload: Any, path: tuple[str | int, ...], literal: str, purpose: str, created: float = NOW
) -> bytes:
    """A signed envelope whose value at `path` is written as `literal` on the wire. The signature covers what the
    verifier will parse (a double, for integers beyond 64 bits), so a literal that parses gets past it."""
    try:
        parsed = orjson.loads(literal)
    except orjson.JSONDecodeError:
        parsed = 0.123456789012345  # unparseable: the verifier stops before the signature
    raw = body(envelope(signer, put(payload, path, parsed), purpose=purpose, created=created))
    token = orjson.dumps(parsed)
    assert raw.count(token) == 1
    return raw.replace(token, literal.encode())


# -- the membership bench --------------------------------------------------------------------------------------


@dataclass
class Bench:
    membership: Membership
    member: Identity
    """Registered; the malformed messages are its own (or claim to be)."""
    other: Identity
    """Registered too: the node a member's message may name instead of itself."""
    seq: Iterator[int]

    def register(self, raw: bytes) -> tuple[Capability, tuple[str, ...]]:
        return self.membership.register(raw)

    def heartbeat(self, raw: bytes) -> Any:
        return self.membership.heartbeat(raw)


def snapshot(membership: Membership) -> Any:
    """Everything a message could change: the nodes, their records, the reliability ledger."""
    nodes = {
        node_id: (
            r.state,
            r.registered_at,
            r.last_heartbeat,
            r.last_seq,
            r.telemetry,
            r.capability,
            tuple(r.transitions),
        )
        for node_id, r in membership.nodes.items()
    }
    book = membership.book
    return nodes, book.events(limit=10**6), book.incidents(limit=10**6), book.transitions(limit=10**6)


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    store = Store("sqlite://")
    store.migrate()
    writer = StoreWriter(store)
    policy = FreshnessPolicy(max_skew_s=CONFIG.max_skew_s, max_lifetime_s=CONFIG.max_message_lifetime_s)
    membership = Membership(CONFIG, EnvelopeVerifier(policy, lambda: NOW), writer, GatewayMetrics(), lambda: NOW)
    member, other = identity_from(b"m" * 32), identity_from(b"o" * 32)
    for identity in (member, other):
        membership.register(body(envelope(identity, register_payload(identity), purpose="register")))
    try:
        yield Bench(membership, member, other, itertools.count(1))
    finally:
        writer.close()
        store.close()


def refused(bench: Bench, send: Callable[[bytes], Any], raw: bytes) -> TrustError:
    """Send a malformed message: it must raise a TrustError (nothing else) and change nothing."""
    before = snapshot(bench.membership)
    with pytest.raises(TrustError) as info:
        send(raw)
    assert snapshot(bench.membership) == before
    return info.value


def intake(bench: Bench, purpose: str) -> Callable[[bytes], Any]:
    return bench.register if purpose == "register" else bench.heartbeat


def valid_payload(bench: Bench, purpose: str) -> dict[str, Any]:
    if purpose == "register":
        return register_payload(bench.member)
    return heartbeat_payload(bench.member, 10**9 + next(bench.seq))


PURPOSES = st.sampled_from(["register", "heartbeat"])

# -- unit level: malformed messages ----------------------------------------------------------------------------


@given(raw=st.binary(max_size=512) | json_values.map(body), purpose=PURPOSES)
@UNIT
def test_any_bytes_or_json_is_refused(bench: Bench, raw: bytes, purpose: str) -> None:
    refused(bench, intake(bench, purpose), raw)


ENVELOPE_PARTS = [("payload",), ("sig",), *(("sig", k) for k in (*SIGNED_PARAMS, "signature"))]


@given(purpose=PURPOSES, data=st.data())
@UNIT
def test_tampered_envelopes_are_refused(bench: Bench, purpose: str, data: st.DataObject) -> None:
    """Missing, extra or changed envelope fields after signing: a bad signature, a malformed or unsigned message."""
    doc = envelope(bench.member, valid_payload(bench, purpose), purpose=purpose)
    action = data.draw(st.sampled_from(["drop", "add", "change"]), label="action")
    if action == "drop":
        path = data.draw(st.sampled_from(ENVELOPE_PARTS), label="path")
        del (doc if len(path) == 1 else doc["sig"])[path[-1]]
    elif action == "add":
        where = data.draw(st.sampled_from([(), ("sig",), ("payload",)]), label="where")
        taken = {*doc, *doc["sig"], *doc["payload"]}
        key = data.draw(st.text(max_size=8).filter(lambda k: k not in taken), label="key")
        doc = put(doc, (*where, key), data.draw(json_values, label="value"))
    else:
        path = data.draw(st.sampled_from(ENVELOPE_PARTS), label="path")
        value = data.draw(json_values | over_long | st.binary(max_size=64).map(lambda b: b.hex()), label="value")
        old = doc[path[0]] if len(path) == 1 else doc["sig"][path[1]]
        assume(canonical(value) != canonical(old))
        doc = put(doc, path, value)
    refused(bench, intake(bench, purpose), body(doc))


@given(purpose=PURPOSES, data=st.data())
@UNIT
def test_signed_envelopes_with_wrongly_typed_parameters_are_refused(
    bench: Bench, purpose: str, data: st.DataObject
) -> None:
    """Signed by the member itself, so only the parameter's type or value is wrong (not the signature)."""
    param = data.draw(st.sampled_from(SIGNED_PARAMS), label="param")
    value = data.draw(wrong_types(envelope(bench.member, {}, purpose=purpose)["sig"][param]), label="value")
    doc = envelope(bench.member, valid_payload(bench, purpose), purpose=purpose, override={param: value})
    refused(bench, intake(bench, purpose), body(doc))


@given(purpose=PURPOSES, seed=seeds)
@UNIT
def test_signatures_by_another_key_are_refused(bench: Bench, purpose: str, seed: bytes) -> None:
    forger = identity_from(seed)
    assume(forger.public_key != bench.member.public_key)
    doc = envelope(forger, valid_payload(bench, purpose), purpose=purpose)
    doc["sig"]["keyid"] = bench.member.public_key
    assert isinstance(refused(bench, intake(bench, purpose), body(doc)), BadSignature)


@given(purpose=PURPOSES, signed_for=st.text(max_size=16))
@UNIT
def test_messages_signed_for_another_purpose_are_refused(bench: Bench, purpose: str, signed_for: str) -> None:
    assume(signed_for != purpose)
    doc = envelope(bench.member, valid_payload(bench, purpose), purpose=signed_for)
    assert isinstance(refused(bench, intake(bench, purpose), body(doc)), WrongSigner)


@given(
    purpose=PURPOSES,
    created=st.floats(-1e12, 1e12),
    lifetime_s=st.floats(-1e6, 1e6),
)
@UNIT
def test_stale_future_and_long_lived_messages_are_refused(
    bench: Bench, purpose: str, created: float, lifetime_s: float
) -> None:
    skew, longest = CONFIG.max_skew_s, CONFIG.max_message_lifetime_s
    start = NOW + created
    end = start + lifetime_s  # as the envelope computes it
    assume(start > NOW + skew or end < NOW - skew or end - start > longest or end < start)
    doc = envelope(bench.member, valid_payload(bench, purpose), purpose=purpose, created=start, lifetime_s=lifetime_s)
    assert isinstance(refused(bench, intake(bench, purpose), body(doc)), Expired | FromTheFuture)


@given(purpose=PURPOSES, data=st.data())
@UNIT
def test_payloads_with_invalid_values_are_refused(bench: Bench, purpose: str, data: st.DataObject) -> None:
    """Signed by the member: a capability or telemetry value of the wrong type, out of range or over-long."""
    table = BAD_CAPABILITY if purpose == "register" else BAD_HEARTBEAT
    path = data.draw(st.sampled_from(sorted(table, key=str)), label="field")
    value = data.draw(table[path], label="value")
    payload = valid_payload(bench, purpose)
    full = ("capability", *path) if purpose == "register" else path
    doc = envelope(bench.member, put(payload, full, value), purpose=purpose)
    refused(bench, intake(bench, purpose), body(doc))


@given(purpose=PURPOSES, data=st.data())
@UNIT
def test_payloads_with_unrepresentable_numbers_are_refused(bench: Bench, purpose: str, data: st.DataObject) -> None:
    fields = list(BAD_CAPABILITY if purpose == "register" else BAD_HEARTBEAT)
    path = data.draw(st.sampled_from(sorted(fields, key=str)), label="field")
    literals = [n for n in RAW_NUMBERS if path not in FLOATS or n != BEYOND_U64]
    literal = data.draw(st.sampled_from(literals), label="literal")
    payload = valid_payload(bench, purpose)
    full = ("capability", *path) if purpose == "register" else path
    refused(bench, intake(bench, purpose), with_raw_number(bench.member, payload, full, literal, purpose))


@given(purpose=PURPOSES)
@settings(UNIT, max_examples=10)
def test_messages_naming_another_node_are_refused(bench: Bench, purpose: str) -> None:
    """The member's key, the other node's id: a registration (key and id) or a heartbeat (id)."""
    if purpose == "register":
        payload = register_payload(bench.other)
    else:
        payload = heartbeat_payload(bench.other, 10**9 + next(bench.seq))
    doc = envelope(bench.member, payload, purpose=purpose)
    assert isinstance(refused(bench, intake(bench, purpose), body(doc)), WrongSigner)


@given(seed=seeds)
@settings(UNIT, max_examples=30)
def test_heartbeats_from_unregistered_keys_are_refused(bench: Bench, seed: bytes) -> None:
    stranger = identity_from(seed)
    assume(stranger.node_id not in bench.membership.nodes)
    doc = envelope(stranger, heartbeat_payload(bench.member, 10**9 + next(bench.seq)), purpose="heartbeat")
    assert isinstance(refused(bench, bench.heartbeat, body(doc)), UnknownNode)


# -- unit level: valid messages ----------------------------------------------------------------------------------


@given(seed=seeds, data=st.data())
@settings(UNIT, max_examples=60)
def test_valid_registrations_are_accepted_once(bench: Bench, seed: bytes, data: st.DataObject) -> None:
    identity = identity_from(seed)
    capability = data.draw(valid_capabilities(identity), label="capability")
    raw = body(envelope(identity, register_payload(identity, capability), purpose="register"))
    assert bench.register(raw) == (capability, ())
    record = bench.membership.nodes[NodeId(identity.node_id)]
    assert record.capability == capability and record.state.value == "up"
    assert isinstance(refused(bench, bench.register, raw), Replayed)


@given(purpose=PURPOSES, data=st.data())
@UNIT
def test_members_a_newer_node_adds_are_left_out_and_the_rest_taken(
    bench: Bench, purpose: str, data: st.DataObject
) -> None:
    """A member this version does not know, anywhere in a node's description of itself (a node upgraded before its
    gateway): the message is taken as it would be without it, and a registration names it back."""
    where = data.draw(st.sampled_from(SURPLUS_AT[purpose]), label="where")
    valid = valid_payload(bench, purpose)
    target = valid
    for step in where:
        target = target[step]
    member = data.draw(name.filter(lambda k: k not in target), label="member")
    doc = envelope(bench.member, put(valid, (*where, member), data.draw(json_values, label="value")), purpose=purpose)
    if purpose == "register":
        capability, unread = bench.register(body(doc))
        assert capability.model_dump(mode="json") == valid["capability"] and len(unread) == 1
        assert unread[0].endswith(member[:64]) or unread[0].endswith("…"), unread
    else:
        record = bench.heartbeat(body(doc))
        assert record.telemetry.model_dump(mode="json") == valid["telemetry"] and record.last_seq == valid["seq"]


@given(telemetry=valid_telemetry)
@settings(UNIT, max_examples=60)
def test_valid_heartbeats_are_accepted_once(bench: Bench, telemetry: Telemetry) -> None:
    seq = 10**9 + next(bench.seq)
    raw = body(envelope(bench.member, heartbeat_payload(bench.member, seq, telemetry), purpose="heartbeat"))
    record = bench.heartbeat(raw)
    assert record.telemetry == telemetry and record.last_seq == seq
    assert isinstance(refused(bench, bench.heartbeat, raw), Replayed)


# -- HTTP level ------------------------------------------------------------------------------------------------


@dataclass
class Live:
    grid: LocalGrid
    node: Identity
    """The grid's real node: malformed messages in its name reach the payload checks (no valid one is sent)."""
    endpoint: str
    gateway_key: str


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    grid = make_grid(Path(tmp_path_factory.mktemp("fuzz-protocol")), ["tiny"], threads=1)
    try:
        grid.start(timeout_s=120)
        node = load_or_create_identity(grid.data_dir / "keys" / "node-0.key")
        (found,) = admin_get(grid, "/admin/nodes").raise_for_status().json()["nodes"]
        assert found["node_id"] == node.node_id
        key = httpx.get(grid.url + "/health", timeout=10).json()["gateway_public_key"]
        yield Live(grid, node, found["endpoint"], key)
    finally:
        grid.stop()


def grid_view(grid: LocalGrid) -> Any:
    """Live nodes, and who is registered with what."""
    health = httpx.get(grid.url + "/health", timeout=10).raise_for_status().json()
    nodes = admin_get(grid, "/admin/nodes").raise_for_status().json()["nodes"]
    return health["nodes_live"], [(n["node_id"], n["endpoint"], n["models"], n["hardware"]) for n in nodes]


@st.composite
def malformed_bodies(draw: st.DrawFn, kind: str, signer: Identity, purpose: str, now: float) -> bytes:
    """A malformed message of one of the unit level's kinds, signed (where signed) by `signer` at `now`."""
    valid = register_payload(signer) if purpose == "register" else heartbeat_payload(signer, 1)
    table = BAD_CAPABILITY if purpose == "register" else BAD_HEARTBEAT
    prefix: tuple[str, ...] = ("capability",) if purpose == "register" else ()
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "json":
        return body(draw(json_values))
    if kind == "surplus":  # a field beside the payload and the signature
        doc = envelope(signer, valid, purpose=purpose, created=now)
        return body({**doc, draw(text.filter(lambda k: k not in doc)): draw(json_values)})
    if kind == "typed":
        param = draw(st.sampled_from(SIGNED_PARAMS))
        value = draw(wrong_types(envelope(signer, {}, purpose=purpose, created=now)["sig"][param]))
        return body(envelope(signer, valid, purpose=purpose, created=now, override={param: value}))
    if kind == "forged":
        doc = envelope(signer, valid, purpose=purpose, created=now)
        forged = draw(st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode()))
        return body(put(doc, ("sig", "signature"), forged))
    if kind == "purpose":
        wrong = draw(st.text(max_size=8).filter(lambda p: p != purpose))
        return body(envelope(signer, valid, purpose=wrong, created=now))
    if kind == "stale":
        return body(envelope(signer, valid, purpose=purpose, created=now + draw(st.sampled_from([-600.0, 600.0]))))
    path = draw(st.sampled_from(sorted(table, key=str)))
    if kind == "number":
        literals = [n for n in RAW_NUMBERS if path not in FLOATS or n != BEYOND_U64]
        return with_raw_number(signer, valid, (*prefix, *path), draw(st.sampled_from(literals)), purpose, now)
    return body(envelope(signer, put(valid, (*prefix, *path), draw(table[path])), purpose=purpose, created=now))


def assert_refused(resp: httpx.Response) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    error = resp.json()["error"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["message"], str) and error["message"]


def post(url: str, raw: bytes) -> httpx.Response:
    return httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)


KINDS = ["bytes", "json", "surplus", "forged", "typed", "purpose", "stale", "value", "number"]


@pytest.mark.parametrize("kind", KINDS)
@given(purpose=PURPOSES, data=st.data())
@HTTP
def test_gateway_refuses_malformed_node_messages(live: Live, kind: str, purpose: str, data: st.DataObject) -> None:
    """In the name of the real node (heartbeats reach the payload checks) or of a new key (registrations that
    would add a node)."""
    before = grid_view(live.grid)
    signer = live.node if purpose == "heartbeat" or data.draw(st.booleans()) else identity_from(data.draw(seeds))
    raw = data.draw(malformed_bodies(kind, signer, purpose, time.time()), label="body")
    assert_refused(post(f"{live.grid.url}/nodes/{purpose}", raw))
    assert grid_view(live.grid) == before


NODE_ROUTES = st.sampled_from(["generate", "load"])


@given(route=NODE_ROUTES, data=st.data())
@settings(HTTP, max_examples=25)
def test_node_refuses_malformed_gateway_requests(live: Live, route: str, data: st.DataObject) -> None:
    """Bytes, JSON, or envelopes signed by a key that is not the gateway's (some claiming the gateway's key)."""
    forger = identity_from(data.draw(seeds))
    payload = {"node_id": live.node.node_id, "model": "gridserve-tiny", "request_id": "fuzz", "prompt": "hi"}
    doc = envelope(forger, payload, purpose=route, created=time.time())
    if data.draw(st.booleans()):
        doc["sig"]["keyid"] = live.gateway_key
    raw = data.draw(st.one_of(st.binary(max_size=256), json_values.map(body), st.just(body(doc))), label="body")
    assert_refused(post(f"{live.endpoint}/internal/{route}", raw))
