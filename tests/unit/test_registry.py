"""The node registry (gateway/registry/registry.py): the one writer of node state, its snapshot table equal to a
rebuild from scratch after any sequence of events, replay equal to live, and heartbeats that leave nothing behind
for the cyclic garbage collector."""

from __future__ import annotations

import ast
import dataclasses
import gc
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.ops.gcwatch import Freezer
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.events import (
    AdminAction,
    Event,
    HeardElsewhere,
    HeartbeatSeen,
    JobObserved,
    Noted,
    ProbeAnswered,
    Registered,
    RequestEnded,
    RequestStarted,
    StateChanged,
    Swept,
)
from gridserve.gateway.registry.ledger_replay import replay
from gridserve.gateway.registry.membership import Membership, UnknownNode
from gridserve.gateway.registry.record import (
    NodeRecord,
    can_serve,
    pack_telemetry,
    telemetry_json,
    unpack_telemetry,
)
from gridserve.gateway.registry.registry import NodeRegistry
from gridserve.reliability import EventKind, NodeEvent, ReliabilityState, Severity
from gridserve.scheduler import named_profile, schedule
from gridserve.scheduler.snapshot import (
    C_BLOCKING,
    C_REL_NEW,
    C_REL_PROBATION,
    C_REL_SCORE,
    N_COLUMNS,
    NodeSnapshot,
)
from gridserve.store import Store, StoreWriter
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, Malformed, WrongSigner, sign_envelope
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo, Telemetry
from gridserve.types.node import NodeError
from gridserve.types.scheduling import ScheduleRequest

T0 = 1_700_000_000.0
CONFIG = GatewayConfig(heartbeat_interval_s=2.0, allow_emulated=True)
NODES = [NodeId(f"node{i}") for i in range(4)]
CARDS = ("rtx4090", "a100-80g", "t4", "apple-m2-max")
SRC = Path(__file__).resolve().parents[2] / "src" / "gridserve"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def capability(node_id: str, card: str = "rtx4090", price: float = 0.0) -> Capability:
    return Capability(
        node_id=NodeId(node_id),
        public_key="pk-" + node_id,
        endpoint=f"http://{node_id}:8000",
        engine=f"emulated:{card}",
        models=(
            ModelOffer(
                name="llama-3-8b",
                dtype="float16",
                quantization="q4_k_m",
                max_context=8192,
                weights_digest="emulated:llama-3-8b",
            ),
        ),
        hardware=HardwareInfo(accelerator=card, emulated=True),
        runtime=RuntimeInfo(gridserve="t", python="t", engine="t"),
        price_per_mtok=price,
    )


def registered(node_id: str, at: float, card: str = "rtx4090", via: str | None = None) -> Registered:
    return Registered(capability(node_id, card), at=at, registered_at=at, capability_at=at, last_seen=at, via=via)


# --- telemetry kept as atoms -------------------------------------------------------------------------------------

names = st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=12)
telemetries = st.builds(
    Telemetry,
    utilization=st.floats(0.0, 1.0),
    memory_used_bytes=st.integers(0, 2**40),
    memory_total_bytes=st.integers(0, 2**40),
    temperature_c=st.none() | st.floats(-40.0, 130.0),
    clock_ratio=st.none() | st.floats(0.0, 1.5),
    clock_reasons=st.lists(names, max_size=3).map(tuple),
    queue_depth=st.integers(0, 100),
    active_requests=st.integers(0, 100),
    tokens_per_s=st.floats(0.0, 1e4),
    errors=st.lists(
        st.builds(NodeError, at=st.floats(0, 2e9), kind=st.sampled_from(["oom", "cuda", "engine"]), message=names),
        max_size=3,
    ).map(tuple),
    faults=st.lists(names, max_size=3).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(telemetry=telemetries)
def test_telemetry_is_kept_as_atoms_and_read_back_equal(telemetry: Telemetry) -> None:
    row = pack_telemetry(telemetry)
    assert unpack_telemetry(row) == telemetry
    assert telemetry_json(row) == telemetry.model_dump(mode="json")
    gc.collect(0)  # the first collection to examine a tuple of atoms stops tracking it
    assert not gc.is_tracked(row)


# --- one writer ------------------------------------------------------------------------------------------------------


def test_a_record_cannot_be_written_outside_the_registry() -> None:
    registry = NodeRegistry(CONFIG)
    registry.apply(registered("a", T0))
    record = registry.nodes[NodeId("a")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.outstanding = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, "state", NodeState.DOWN)  # noqa: B010
    with pytest.raises(TypeError):
        registry.nodes[NodeId("b")] = record  # type: ignore[index]
    assert record.outstanding == 0 and record.state == NodeState.UP


RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(NodeRecord)) - {"capability", "static"}


def record_writers(source: str, path: str) -> list[str]:
    """Places in `source` that write a node record's fields: `x.<field> = ...` (x not `self`), `object.__setattr__`
    on anything but `self`, or the registry's `assign`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for t in _assigned(targets):
            if t.attr in RECORD_FIELDS and not _is_self(t.value):
                found.append(f"{path}:{t.lineno}: assigns .{t.attr}")
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "__setattr__"
                and isinstance(func.value, ast.Name)
                and func.value.id == "object"
                and node.args
                and not _is_self(node.args[0])
            ):
                found.append(f"{path}:{node.lineno}: object.__setattr__")
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name == "assign":
                found.append(f"{path}:{node.lineno}: assign()")
        if isinstance(node, ast.ImportFrom) and node.module == "gridserve.gateway.registry.record":
            found += [f"{path}:{node.lineno}: imports assign" for alias in node.names if alias.name == "assign"]
    return found


def _assigned(targets: list[ast.expr]) -> list[ast.Attribute]:
    """The attributes an assignment binds (`a.b = ...`, `a.b, c = ...`; not `a.b[k] = ...`, which binds no
    attribute)."""
    out: list[ast.Attribute] = []
    for target in targets:
        if isinstance(target, ast.Attribute):
            out.append(target)
        elif isinstance(target, ast.Tuple | ast.List):
            out += _assigned(list(target.elts))
        elif isinstance(target, ast.Starred):
            out += _assigned([target.value])
    return out


def _is_self(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def test_the_scan_finds_each_way_of_writing_a_record() -> None:
    bad = (
        "record.outstanding += 1\n"
        "r.state = NodeState.DOWN\n"
        "object.__setattr__(record, 'telemetry_row', None)\n"
        "from gridserve.gateway.registry.record import assign\n"
        "assign(record, via=None)\n"
        "self.outstanding = 0\n"  # a class's own field: not a record write
        "scope.state[key] = 1\n"  # a dict held in an attribute: not a record write
    )
    assert len(record_writers(bad, "x.py")) == 5


def test_only_the_registry_assigns_node_record_fields() -> None:
    """Every module of the gateway outside gateway/registry/ (the only package that may import it) is scanned."""
    registry_dir = SRC / "gateway" / "registry"
    writers = []
    for path in sorted((SRC / "gateway").rglob("*.py")):
        if registry_dir not in path.parents:
            writers += record_writers(path.read_text(), str(path.relative_to(SRC)))
    assert writers == []
    inside = sum(len(record_writers(p.read_text(), p.name)) for p in registry_dir.glob("*.py"))
    assert inside > 0, "the scan finds the registry's own writes (it is not blind)"


def test_one_predicate_says_whether_a_node_can_serve() -> None:
    for state in NodeState:
        for reliability in ReliabilityState:
            expected = state in (NodeState.UP, NodeState.SUSPECT, NodeState.PROBATION) and reliability not in (
                ReliabilityState.EJECTED,
                ReliabilityState.QUARANTINED,
                ReliabilityState.BANNED,
            )
            assert can_serve(state, reliability) is expected
    registry = NodeRegistry(CONFIG)
    registry.apply(registered("a", T0))
    assert registry.can_serve("a", T0) and not registry.can_serve("nobody", T0)
    registry.apply(AdminAction(NodeId("a"), at=T0, action="quarantine", reason="test"))
    assert not registry.can_serve("a", T0)


# --- the table equals a rebuild ---------------------------------------------------------------------------------------


@st.composite
def event_sequences(draw: st.DrawFn, frozen_time: bool) -> list[Event]:
    """Events over a few nodes; the first registers every node. `frozen_time`: all at T0 (else time moves on)."""
    nodes = NODES[: draw(st.integers(1, len(NODES)))]
    events: list[Event] = [registered(n, T0, CARDS[i]) for i, n in enumerate(nodes)]
    now = T0
    for seq in range(1, draw(st.integers(0, 40)) + 1):
        if not frozen_time:
            now += draw(st.sampled_from([0.0, 0.5, 3.0, 7.0, 40.0]))
        node = draw(st.sampled_from(nodes))
        kind = draw(st.integers(0, 12))
        event: Event
        if kind == 0:
            event = HeartbeatSeen(node, at=now, seq=draw(st.sampled_from([seq, 0])), telemetry=draw(telemetries))
        elif kind == 1:
            event = HeardElsewhere(
                node, at=now, last_seen=now - draw(st.sampled_from([0.0, 1.0, 30.0])), telemetry=None
            )
        elif kind == 2:
            event = ProbeAnswered(node, at=now, ok=draw(st.booleans()), rtt_s=0.01, error="refused")
        elif kind == 3:
            event = RequestStarted(node)
        elif kind == 4:
            event = RequestEnded(node)
        elif kind == 5:
            event = JobObserved(
                node,
                0.2,
                0.1,
                draw(st.none() | st.just(0.2)),
                0.01,
                draw(st.none() | st.just(0.02)),
                draw(st.none() | st.just((0.05, 0.08))),
                draw(st.none() | st.integers(1, 300)),
            )
        elif kind in (6, 7):
            job = draw(st.sampled_from([EventKind.JOB_COMPLETED, EventKind.JOB_FAILED, EventKind.JOB_TIMED_OUT]))
            event = Noted(
                NodeEvent(node_id=node, kind=job, at=now, within_slo=True if job == EventKind.JOB_COMPLETED else None)
            )
        elif kind == 8:
            severity = draw(st.sampled_from(Severity))
            event = Noted(NodeEvent(node_id=node, kind=EventKind.INCIDENT, at=now, severity=severity, detail="x"))
        elif kind == 9:
            event = StateChanged(node, at=now, state=draw(st.sampled_from(NodeState)), reason="judged", if_live=False)
        elif kind == 10:
            event = AdminAction(
                node, at=now, action=draw(st.sampled_from(["quarantine", "release"])), reason="r", stored=True
            )
        elif kind == 11:
            event = Swept(now)
        else:
            event = registered(node, now, draw(st.sampled_from(CARDS)), via=draw(st.none() | st.just("gw2")))
        events.append(event)
    return events


def _apply_all(registry: NodeRegistry, events: list[Event]) -> None:
    for event in events:
        registry.apply(event)


def _rebuilt(registry: NodeRegistry, now: float) -> list[NodeSnapshot]:
    return [record.snapshot(registry.book, now) for record in registry.nodes.values()]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_sequences(frozen_time=True))
def test_the_table_equals_a_rebuild_after_any_events(events: list[Event]) -> None:
    """With the clock still (scores do not decay between events), every row, every snapshot the table builds and
    every model row equal those built from scratch from the records and the book."""
    registry = NodeRegistry(CONFIG)
    _apply_all(registry, events)
    table, rebuilt = registry.table, _rebuilt(registry, T0)
    assert [s.node_id for s in table] == [s.node_id for s in rebuilt]
    assert table.snapshots() == rebuilt
    expected = np.frombuffer(b"".join(s.row for s in rebuilt), dtype=np.float64).reshape(-1, N_COLUMNS)
    np.testing.assert_array_equal(table.rows(), expected)
    model = np.stack([np.frombuffer(s.static.model_row("llama-3-8b")) for s in rebuilt])
    np.testing.assert_array_equal(table.model_rows("llama-3-8b"), model)


RELIABILITY_COLUMNS = [C_BLOCKING, C_REL_SCORE, C_REL_PROBATION, C_REL_NEW]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_sequences(frozen_time=False))
def test_as_time_passes_rows_hold_every_fact_and_reliability_as_of_the_last_event(events: list[Event]) -> None:
    """With time moving, each row holds the node's current facts; its reliability columns are the book's as of the
    node's latest event (what the row's snapshot carries); a heartbeat from every node brings them to now."""
    registry = NodeRegistry(CONFIG)
    _apply_all(registry, events)
    now = max((getattr(e, "at", T0) for e in events), default=T0)
    rebuilt = _rebuilt(registry, now)
    facts = [c for c in range(N_COLUMNS) if c not in RELIABILITY_COLUMNS]
    expected = np.frombuffer(b"".join(s.row for s in rebuilt), dtype=np.float64).reshape(-1, N_COLUMNS)
    np.testing.assert_array_equal(registry.table.rows()[:, facts], expected[:, facts])
    for snap in registry.table:
        assert snap.reliability == registry.summary(snap.node_id)
    later = now + 1.0
    for i, node_id in enumerate(registry.nodes):
        registry.apply(HeartbeatSeen(node_id, at=later, seq=10_000 + i, telemetry=Telemetry()))
    assert registry.table.snapshots() == _rebuilt(registry, later)


def test_an_ended_ejection_reaches_the_table_at_the_next_sweep() -> None:
    registry = NodeRegistry(CONFIG)
    for i in range(20):  # a pool large enough for the ejection limit to allow one
        registry.apply(registered(f"n{i}", T0))
    for k in range(registry.book.config.consecutive_failures_to_eject):
        registry.apply(Noted(NodeEvent(node_id="n0", kind=EventKind.JOB_FAILED, at=T0 + k)))
    summary = registry.summary("n0")
    assert summary is not None and summary.state == ReliabilityState.EJECTED and summary.ejected_until is not None
    assert registry.table.rows()[0, C_BLOCKING] == 1.0
    registry.apply(Swept(summary.ejected_until - 0.1))
    assert registry.table.rows()[0, C_BLOCKING] == 1.0
    registry.apply(Swept(summary.ejected_until + 0.1))
    assert registry.table.rows()[0, C_BLOCKING] == 0.0
    assert registry.table.rows()[0, C_REL_PROBATION] == 1.0


def test_load_columns_follow_requests_in_flight() -> None:
    registry = NodeRegistry(CONFIG)
    registry.apply(registered("a", T0))
    registry.apply(HeartbeatSeen(NodeId("a"), at=T0, seq=1, telemetry=Telemetry(active_requests=2)))
    for _ in range(3):
        registry.apply(RequestStarted(NodeId("a")))
    registry.apply(RequestEnded(NodeId("a")))
    assert registry.nodes[NodeId("a")].outstanding == 2
    np.testing.assert_array_equal(registry.table.rows(), np.frombuffer(registry.table[0].row).reshape(1, -1))
    for _ in range(5):
        registry.apply(RequestEnded(NodeId("a")))  # more ends than starts: clamped at 0
    assert registry.nodes[NodeId("a")].outstanding == 0
    assert not registry.apply(RequestStarted(NodeId("gone"))).applied


# --- a decision's view of the table ----------------------------------------------------------------------------------


def test_a_view_adds_a_decisions_own_candidates_and_leaves_the_table_alone() -> None:
    registry = NodeRegistry(CONFIG)
    for i in range(5):
        registry.apply(registered(f"n{i}", T0, CARDS[i % len(CARDS)]))
    extra = NodeRecord(capability(NodeId("pipeline:x")), NodeState.UP, T0, T0).snapshot(registry.book, T0)
    view = registry.table.view()
    view.append(extra)
    assert len(view) == 6 and len(registry.table) == 5 and view[-1] is extra and view.get(extra.node_id) is extra
    assert [s.node_id for s in view] == [s.node_id for s in registry.table] + [extra.node_id]
    np.testing.assert_array_equal(view.rows()[-1], np.frombuffer(extra.row))
    np.testing.assert_array_equal(view.model_rows("llama-3-8b")[:5], registry.table.model_rows("llama-3-8b"))
    sample = view.sample(np.array([1, 5]), "llama-3-8b")
    assert [s.node_id for s in sample] == ["n1", extra.node_id]
    np.testing.assert_array_equal(sample.rows(), view.rows()[[1, 5]])
    with pytest.raises(TypeError):
        view.put(extra)


@pytest.mark.parametrize(("n", "sample"), [(6, 0), (60, 0), (60, 16)])
def test_deciding_over_the_table_decides_as_over_snapshots_built_from_scratch(n: int, sample: int) -> None:
    """Per-node path (few nodes), column path, and a sampled pool: the same decision, with a decision's own
    candidate appended to the view as to the list."""
    registry = NodeRegistry(CONFIG)
    rng = random.Random(3)
    for i in range(n):
        node = NodeId(f"n{i}")
        registry.apply(registered(node, T0, rng.choice(CARDS)))
        registry.apply(HeartbeatSeen(node, at=T0, seq=1, telemetry=Telemetry(active_requests=rng.randint(0, 3))))
        for _ in range(rng.randint(0, 2)):
            registry.apply(RequestStarted(node))
        if rng.random() < 0.2:
            registry.apply(Noted(NodeEvent(node_id=node, kind=EventKind.JOB_FAILED, at=T0)))
    extra = NodeRecord(capability("pipeline:llama-3-8b", "h100-sxm"), NodeState.UP, T0, T0).snapshot(registry.book, T0)
    profile = dataclasses.replace(named_profile("default"), sample=sample)
    request = ScheduleRequest(request_id="r", model="llama-3-8b", prompt_tokens=300, max_tokens=50)
    for seed in range(5):
        view = registry.table.view()
        view.append(extra)
        from_table = schedule(request, view, profile, random.Random(seed), T0, decision_id="d")
        rebuilt = schedule(request, [*_rebuilt(registry, T0), extra], profile, random.Random(seed), T0, decision_id="d")
        assert from_table.chosen == rebuilt.chosen and from_table.chosen is not None
        assert from_table.candidates == rebuilt.candidates
        assert from_table.explanation == rebuilt.explanation


# --- replay and other gateways take the same path as live traffic ----------------------------------------------------

ledger_steps = st.lists(
    st.tuples(
        st.sampled_from(NODES[:3]),
        st.sampled_from(["done", "failed", "timed_out", "minor", "severe", "canary", "quarantine", "release"]),
        st.floats(0.0, 50.0),
    ),
    max_size=30,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(steps=ledger_steps)
def test_replay_gives_the_state_live_traffic_gave(steps: list[tuple[str, str, float]], tmp_path_factory: Any) -> None:
    """What a gateway noted live (job outcomes, incidents, canaries, admin actions), replayed from its store into a
    fresh registry after a restart, gives the same reliability state, scores and history for every node."""
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('replay') / 'gs.db'}")
    store.migrate()
    clock = Clock()
    live = Membership(CONFIG, EnvelopeVerifier(FreshnessPolicy(), clock), StoreWriter(store), GatewayMetrics(), clock)
    for i, node in enumerate(NODES[:3]):
        live.apply(registered(node, T0, CARDS[i]))
    kinds = {"done": EventKind.JOB_COMPLETED, "failed": EventKind.JOB_FAILED, "timed_out": EventKind.JOB_TIMED_OUT}
    for node, what, dt in steps:
        clock.t += dt
        if what in kinds:
            live.note(NodeEvent(node_id=node, kind=kinds[what], at=clock.t))
        elif what in ("minor", "severe"):
            live.note(NodeEvent(node_id=node, kind=EventKind.INCIDENT, at=clock.t, severity=Severity(what), detail="x"))
        elif what == "canary":
            live.note(NodeEvent(node_id=node, kind=EventKind.CANARY_PASSED, at=clock.t))
        elif what == "quarantine":
            live.quarantine(NodeId(node), "by hand")
        elif live.book.state(node, clock.t) != ReliabilityState.BANNED:
            live.release(NodeId(node), "by hand")
    live.flush_events()
    live.writer.close()
    restarted = NodeRegistry(CONFIG)
    replay(store, restarted)
    for node in NODES[:3]:
        assert restarted.book.summary(node, clock.t) == live.book.summary(node, clock.t)
        assert restarted.book.incidents(node) == live.book.incidents(node)
        assert [(t.old, t.new) for t in restarted.book.transitions(node)] == [
            (t.old, t.new) for t in live.book.transitions(node)
        ]
    store.close()


# --- heartbeats leave nothing for the collector -----------------------------------------------------------------------


def _grid(n: int) -> NodeRegistry:
    registry = NodeRegistry(CONFIG)
    rng = random.Random(1)
    for i in range(n):
        registry.apply(registered(f"n{i}", T0, rng.choice(CARDS)))
    return registry


def _beat_all(registry: NodeRegistry, k: int) -> None:
    for i, node_id in enumerate(registry.nodes):
        telemetry = Telemetry(active_requests=(i + k) % 4, utilization=((i + k) % 10) / 10, clock_reasons=("Idle",))
        registry.apply(HeartbeatSeen(node_id, at=T0 + k, seq=k, telemetry=telemetry))


def test_a_heartbeat_leaves_no_object_the_collector_tracks() -> None:
    """After warm-up, a round of heartbeats from 500 nodes leaves the tracked object count where it was: what a
    heartbeat stores (telemetry, reliability summary) is untracked by the first young collection, and the row is
    written into the table's array in place."""
    registry = _grid(500)
    for k in (1, 2):
        _beat_all(registry, k)
    gc.collect()
    before = len(gc.get_objects())
    _beat_all(registry, 3)
    gc.collect()
    assert len(gc.get_objects()) - before < 5  # not per node: 500 nodes would be >= 500
    record = registry.nodes[NodeId("n7")]
    assert record.telemetry_row is not None and not gc.is_tracked(record.telemetry_row)
    assert not any(
        gc.is_tracked(getattr(record, f.name))
        for f in dataclasses.fields(record)
        if f.name not in ("capability", "static", "calibration", "state")  # registration's, shared, an enum member
    )


def test_the_membership_heartbeat_path_leaves_nothing_per_node(tmp_path: Path) -> None:
    """The same through the membership's intake (signed heartbeats verified, the store's rolled-up write queued)."""
    from gridserve.trust import Identity, sign_envelope

    store = Store(f"sqlite:///{tmp_path / 'gs.db'}")
    store.migrate()
    clock = Clock()
    membership = Membership(
        CONFIG, EnvelopeVerifier(FreshnessPolicy(), clock), StoreWriter(store), GatewayMetrics(), clock
    )
    idents = [Identity.generate() for _ in range(200)]
    for ident in idents:
        cap = capability(ident.node_id).model_copy(update={"public_key": ident.public_key})
        membership.register(
            sign_envelope(ident, {"capability": cap.model_dump(mode="json")}, purpose="register", now=clock.t)
        )

    def beat(k: int) -> None:
        clock.t = T0 + k
        for ident in idents:
            payload = {"node_id": ident.node_id, "seq": k, "telemetry": {"active_requests": k % 3}}
            membership.heartbeat(sign_envelope(ident, payload, purpose="heartbeat", now=clock.t))
        membership.flush_events()
        membership.writer.flush(30)

    beat(1)
    beat(2)
    gc.collect()
    before = len(gc.get_objects())
    beat(3)
    gc.collect()
    assert len(gc.get_objects()) - before < 50  # 200 nodes: well under one object per node
    membership.writer.close()
    store.close()


def _registered(tmp_path: Path) -> tuple[Membership, Identity, Clock]:
    store = Store(f"sqlite:///{tmp_path / 'gs.db'}")
    store.migrate()
    clock = Clock()
    membership = Membership(
        CONFIG, EnvelopeVerifier(FreshnessPolicy(), clock), StoreWriter(store), GatewayMetrics(), clock
    )
    ident = Identity.generate()
    cap = capability(ident.node_id).model_copy(update={"public_key": ident.public_key})
    membership.register(
        sign_envelope(ident, {"capability": cap.model_dump(mode="json")}, purpose="register", now=clock.t)
    )
    return membership, ident, clock


def test_a_channel_heartbeat_is_applied_as_a_signed_one(tmp_path: Path) -> None:
    """A bare heartbeat from a tunnel (no envelope) moves the node's liveness, sequence and telemetry as a signed one
    does, and is queued for the store the same way."""
    membership, ident, clock = _registered(tmp_path)
    node_id = NodeId(ident.node_id)
    clock.t = T0 + 7
    payload = {"node_id": ident.node_id, "seq": 4, "telemetry": {"active_requests": 2}}
    membership.channel_heartbeat(node_id, orjson.dumps(payload))
    record = membership.nodes[node_id]
    assert (record.last_heartbeat, record.last_seq) == (T0 + 7, 4)
    assert record.telemetry_row is not None and unpack_telemetry(record.telemetry_row).active_requests == 2
    assert membership._pending_beats[node_id][0] == T0 + 7
    membership.writer.close()


@pytest.mark.parametrize(
    ("who", "body", "error", "message"),
    [
        ("stranger", b'{"node_id":"x","seq":1,"telemetry":{}}', UnknownNode, "unregistered node"),
        ("node", b'{"node_id":"someone-else","seq":1,"telemetry":{}}', WrongSigner, "another node"),
        ("node", b'{"node_id":"NODE","seq":"one","telemetry":{}}', Malformed, "heartbeat invalid"),
        ("node", b"not json", Malformed, "heartbeat invalid"),
    ],
)
def test_a_channel_heartbeat_that_is_not_the_tunnels_nodes_own_is_refused(
    tmp_path: Path, who: str, body: bytes, error: type[Exception], message: str
) -> None:
    """The tunnel's node is who sent it (its channel proves that); the payload must name that node, be one of this
    grid's nodes and be a heartbeat. Nothing is applied otherwise."""
    membership, ident, _ = _registered(tmp_path)
    node_id = NodeId(ident.node_id if who == "node" else "stranger")
    before = membership.nodes[NodeId(ident.node_id)]
    last = (before.last_heartbeat, before.last_seq)
    with pytest.raises(error, match=message):
        membership.channel_heartbeat(node_id, body.replace(b"NODE", ident.node_id.encode()))
    after = membership.nodes[NodeId(ident.node_id)]
    assert (after.last_heartbeat, after.last_seq) == last
    membership.writer.close()


# --- the freeze after registrations ---------------------------------------------------------------------------------


def test_the_freezer_waits_for_a_burst_to_end_then_freezes_once() -> None:
    freezer = Freezer(batch=100)
    freezer.grew()
    assert not freezer.settle(), "off until enabled"
    freezer.enabled = True
    before = gc.get_freeze_count()
    try:
        freezer.grew()
        assert not freezer.settle(), "registrations came since the last tick: the burst goes on"
        assert freezer.settle() and gc.get_freeze_count() >= before
        assert not freezer.settle(), "nothing new to freeze"
        for _ in range(100):
            freezer.grew()
        assert freezer.settle(), "a long burst is frozen every `batch` registrations"
        assert freezer.freezes == 2 and math.isfinite(freezer.last_pause_s)
    finally:
        gc.unfreeze()


def test_a_snapshot_replaced_from_a_table_row_gets_its_own_row() -> None:
    """The table hands its row to the snapshots it builds; `dataclasses.replace` of one computes the row afresh."""
    registry = NodeRegistry(CONFIG)
    registry.apply(registered("a", T0))
    built = registry.table[0]
    busier = dataclasses.replace(built, outstanding=7)
    assert built.row == NodeRecord(built.capability, NodeState.UP, T0, T0).snapshot(registry.book, T0).row
    assert busier.row != built.row and busier.row == dataclasses.replace(busier).row


def test_calibration_judges_the_nodes_own_service_time_not_the_queue_it_was_predicted_to_wait() -> None:
    """A node predicted to answer in 10 s, 9 of them queued behind a job whose length was guessed, that answers in
    1.5 s of which it reports 0.5 s queued, served as fast as predicted: its factor stays 1 (judged on whole TTFTs
    it would become 0.15, and every later prediction of its prefill 7x too fast). Its answers' length is learned."""

    def calibrated(service: tuple[float, float] | None) -> tuple[float, float]:
        registry = NodeRegistry(CONFIG)
        registry.apply(registered("n-a", T0, "cpu"))
        for _ in range(12):
            registry.apply(JobObserved(NodeId("n-a"), 1.5, 10.0, 1.5, 0.01, 0.01, service, 8))
        cal = registry.table.snapshots()[0].calibration
        assert cal is not None
        return cal.ttft_factor, cal.output_tokens

    assert calibrated((1.0, 1.0)) == (pytest.approx(1.0), pytest.approx(8.0))
    assert calibrated(None) == (pytest.approx(0.15), pytest.approx(8.0))


def test_the_hedge_delays_ratio_p95_is_kept_with_the_ratios_and_survives_a_new_registration() -> None:
    """The p95 of a node's observed/predicted TTFT ratios (its hedge delay) is worked out when a ratio comes in,
    not on every dispatch: None below 8 ratios, then the 95th percentile of the last 256; a node registering again
    keeps both."""
    registry = NodeRegistry(CONFIG)
    registry.apply(registered("n-a", T0))
    node = NodeId("n-a")
    for i in range(300):
        registry.apply(JobObserved(node, 0.2, 0.1, 0.1 * (1 + (i * 37) % 100), 0.01, 0.01))
        ratios = registry.nodes[node].ttft_ratios
        expected = None if len(ratios) < 8 else sorted(ratios)[min(len(ratios) - 1, int(0.95 * len(ratios)))]
        assert registry.nodes[node].ttft_ratio_p95() == expected
    assert len(ratios) == 256 and expected is not None
    registry.apply(registered("n-a", T0 + 1.0))
    assert registry.nodes[node].ttft_ratios == ratios and registry.nodes[node].ttft_ratio_p95() == expected
