"""Vetting new identities (issue 17): an identity serves only the exploration share of a model's requests until it
has passed its checks, and a fresh key from where a quarantined one was owes more of them."""

import random
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.test_scheduler import NOW, Spec, build, request

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.ledger_replay import replay, restore_marks
from gridserve.gateway.registry.membership import Membership
from gridserve.gateway.registry.whitewash import Marks, Signals, signals_of
from gridserve.reliability import EventKind, NodeEvent, ReliabilityBook, ReliabilityConfig, Severity
from gridserve.scheduler import NodeSnapshot, default_profile
from gridserve.scheduler import schedule as _schedule
from gridserve.store import Store, StoreWriter
from gridserve.trust import EnvelopeVerifier, FreshnessPolicy, Identity, sign_envelope

PROFILE = default_profile()
EXPLORATION = 0.05


def passed(book: ReliabilityBook, node: str, n: int, at: float = NOW, kind: EventKind = EventKind.AUDIT_PASSED) -> None:
    for _ in range(n):
        book.record(NodeEvent(node_id=node, kind=kind, at=at))


# -- the book ----------------------------------------------------------------------------------------------------


def test_an_identity_is_vetted_after_its_checks_and_vetting_starts_over_after_a_severe_incident() -> None:
    book = ReliabilityBook()
    passed(book, "n", 2)
    assert not book.summary("n", NOW).vetted
    passed(book, "n", 1, kind=EventKind.CANARY_PASSED)
    assert book.summary("n", NOW).vetted, "audits and canaries both count"
    book.record(NodeEvent(node_id="n", kind=EventKind.INCIDENT, at=NOW, severity=Severity.SEVERE, detail="x"))
    assert not book.summary("n", NOW).vetted
    assert ReliabilityBook(ReliabilityConfig(vetting_checks=0)).summary("fresh", NOW).vetted


def test_a_matched_identity_owes_the_whitewash_checks_on_top() -> None:
    config = ReliabilityConfig(vetting_checks=3, whitewash_checks=6)
    book = ReliabilityBook(config)
    book.record(NodeEvent(node_id="n", kind=EventKind.SIGNALS_MATCHED, at=NOW, detail="address 10.0.0.9"))
    assert book.summary("n", NOW).clean < book.summary("never-seen", NOW).clean, "the match is a minor incident"
    passed(book, "n", 8)
    assert not book.summary("n", NOW).vetted
    passed(book, "n", 1)
    assert book.summary("n", NOW).vetted


# -- the scheduler -----------------------------------------------------------------------------------------------


VETTED = (("hb", 10), ("ok", 30), ("audit", 3))
UNVETTED = (("hb", 10), ("ok", 30))


def _grid(sybils: int, *, better: bool) -> list[NodeSnapshot]:
    """One vetted node and `sybils` unvetted ones; `better`: the Sybils score higher (idle, the vetted node busy)."""
    nodes = [build(Spec(history=VETTED, outstanding=3 if better else 0), "vetted")]
    nodes += [build(Spec(history=UNVETTED, outstanding=0 if better else 3), f"sybil{i}") for i in range(sybils)]
    return nodes


@settings(max_examples=12, deadline=None)
@given(sybils=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_newcomers_together_get_at_most_the_exploration_share(sybils: int, seed: int) -> None:
    nodes = _grid(sybils, better=True)
    rng = random.Random(seed)
    decisions = [_schedule(request(), nodes, PROFILE, rng, NOW) for _ in range(400)]
    to_sybils = sum(d.chosen != "vetted" for d in decisions)
    # Binomial(400, 0.05): mean 20, sd 4.4; 45 is more than 5 sd above.
    assert to_sybils <= 45, f"{to_sybils} of 400 requests went to {sybils} unvetted identities"
    held = next(d for d in decisions if d.chosen == "vetted")
    assert f"{sybils} unvetted newcomer(s) held back" in held.picked_by


def test_without_an_established_node_newcomers_are_ranked_like_any_node() -> None:
    nodes = [node for node in _grid(3, better=True) if node.node_id != "vetted"]
    decision = _schedule(request(), nodes, PROFILE, random.Random(1), NOW)
    assert decision.chosen is not None and "held back" not in decision.picked_by


def test_the_vetted_node_is_picked_over_better_scoring_newcomers() -> None:
    nodes = _grid(5, better=True)
    no_exploration = PROFILE.__class__(**{**PROFILE.__dict__, "picker": PROFILE.picker.__class__(exploration=0.0)})
    decision = _schedule(request(), nodes, no_exploration, random.Random(3), NOW)
    assert decision.candidates[0].node_id != "vetted", "the newcomers score higher"
    assert decision.chosen == "vetted"


# -- whitewashing signals ------------------------------------------------------------------------------------------


def test_marks_match_other_identities_only_within_their_time_and_bound() -> None:
    marks = Marks(keep=3, ttl_s=100.0)
    bad = Signals(address="10.0.0.9", endpoint="10.0.0.9:8000", fingerprint="f1")
    marks.registered("old", bad)
    marks.fell("old", at=0.0)
    fresh = Signals(address="10.0.0.9", endpoint="10.0.0.10:8000", fingerprint="f2")
    assert [m.signal for m in marks.matches("new", fresh, now=50.0)] == ["address"]
    assert marks.matches("old", bad, now=50.0) == [], "an identity does not match its own marks"
    assert marks.matches("new", fresh, now=101.0) == [], "marks lapse"
    marks.fell("never-registered", at=0.0)  # nothing known: nothing marked
    assert [m.signal for m in marks.matches("new", fresh, now=50.0)] == ["address"]
    marks.registered("later", Signals(address="10.0.0.77", endpoint="", fingerprint=""))
    marks.fell("later", at=10.0)
    assert marks.matches("new", fresh, now=50.0) == [], "bounded: the oldest mark is forgotten"
    assert [m.node_id for m in marks.matches("new", Signals("10.0.0.77", "", ""), now=50.0)] == ["later"]


def test_a_fresh_key_from_a_quarantined_identitys_address_starts_further_back(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'gs.db'}")
    store.migrate()
    config = GatewayConfig(allow_emulated=True, vetting_checks=3, whitewash_checks=6)
    membership = Membership(
        config, EnvelopeVerifier(FreshnessPolicy(), time.time), StoreWriter(store), GatewayMetrics()
    )
    caught, fresh, elsewhere = Identity.generate(), Identity.generate(), Identity.generate()
    membership.register(_registration(caught, "http://10.0.0.9:8000"), "203.0.113.7")
    membership.note(
        NodeEvent(node_id=caught.node_id, kind=EventKind.INCIDENT, at=time.time(), severity=Severity.SEVERE, detail="x")
    )
    membership.register(_registration(fresh, "http://10.0.0.9:8001"), "203.0.113.7")
    membership.register(_registration(elsewhere, "http://10.0.0.50:8000", accelerator="a100-40g"), "198.51.100.2")
    matched = membership.book.events(fresh.node_id, kinds={EventKind.SIGNALS_MATCHED})
    assert len(matched) == 1 and "address 203.0.113.7" in matched[0].detail and caught.node_id in matched[0].detail
    assert membership.book.events(elsewhere.node_id, kinds={EventKind.SIGNALS_MATCHED}) == []
    for node in (fresh, elsewhere):
        passed(membership.book, node.node_id, 3)
    assert membership.book.summary(elsewhere.node_id, NOW).vetted
    assert not membership.book.summary(fresh.node_id, NOW).vetted
    membership.register(_registration(fresh, "http://10.0.0.9:8001"), "203.0.113.7")  # a restart: no new match
    assert len(membership.book.events(fresh.node_id, kinds={EventKind.SIGNALS_MATCHED})) == 1
    membership.writer.close()


def test_the_marks_survive_a_gateway_restart(tmp_path: Path) -> None:
    """A restart used to forget them: the quarantined identity stayed quarantined (its ledger is replayed), but a
    fresh key from its address started from zero again."""
    store = Store(f"sqlite:///{tmp_path / 'gs.db'}")
    store.migrate()
    config = GatewayConfig(allow_emulated=True, vetting_checks=3, whitewash_checks=6)

    def gateway() -> Membership:
        return Membership(config, EnvelopeVerifier(FreshnessPolicy(), time.time), StoreWriter(store), GatewayMetrics())

    before = gateway()
    caught, bystander = Identity.generate(), Identity.generate()
    before.register(_registration(caught, "http://10.0.0.9:8000"), "203.0.113.7")
    before.register(_registration(bystander, "http://10.0.0.50:8000", accelerator="a100-40g"), "198.51.100.2")
    fell_at = time.time()
    before.note(
        NodeEvent(node_id=caught.node_id, kind=EventKind.INCIDENT, at=fell_at, severity=Severity.SEVERE, detail="x")
    )
    before.flush_events()  # (as the gateway does at exit)
    before.writer.close()

    after = gateway()
    replay(store, after.book)
    assert restore_marks(store, after.book, after.marks, time.time()) == 1  # the bystander left no mark
    fresh = Identity.generate()
    after.register(_registration(fresh, "http://10.0.0.77:9000", accelerator="a100-40g"), "203.0.113.7")
    matched = after.book.events(fresh.node_id, kinds={EventKind.SIGNALS_MATCHED})
    assert len(matched) == 1 and f"address 203.0.113.7 of quarantined identity {caught.node_id}" in matched[0].detail
    other = Identity.generate()  # the bystander's address and endpoint mark nothing
    after.register(_registration(other, "http://10.0.0.50:8000", accelerator="h100-sxm"), "198.51.100.2")
    assert after.book.events(other.node_id, kinds={EventKind.SIGNALS_MATCHED}) == []
    marks = Marks(ttl_s=1.0)  # a mark restored with the time its identity fell: lapsed after its ttl as before
    restore_marks(store, after.book, marks, time.time())
    assert marks.matches(fresh.node_id, after.marks.signals(fresh.node_id) or Signals("", "", ""), fell_at + 0.5)
    assert not marks.matches(fresh.node_id, after.marks.signals(fresh.node_id) or Signals("", "", ""), fell_at + 2)
    after.writer.close()


def test_signals_name_the_endpoint_and_fingerprint_the_description() -> None:
    a = signals_of(_capability(Identity.generate(), "http://h.example:9000"), "?")
    b = signals_of(_capability(Identity.generate(), "https://h.example"), "1.2.3.4")
    assert a.address == "" and a.endpoint == "h.example:9000" and b.endpoint == "h.example:443"
    assert a.fingerprint == b.fingerprint, "same engine and hardware, whatever the key"
    c = signals_of(_capability(Identity.generate(), "http://h.example", accelerator="a100-40g"), "")
    assert c.fingerprint != a.fingerprint


def _capability(identity: Identity, endpoint: str, accelerator: str = "rtx4090"):  # type: ignore[no-untyped-def]
    from gridserve.types import Capability, HardwareInfo, ModelOffer, RuntimeInfo

    return Capability(
        node_id=identity.node_id,
        public_key=identity.public_key,
        endpoint=endpoint,
        engine="emulated",
        models=(ModelOffer(name="llama-3-8b", weights_digest="emulated:llama-3-8b"),),
        hardware=HardwareInfo(accelerator=accelerator, emulated=True, memory_bytes=24 * 2**30),
        runtime=RuntimeInfo(gridserve="0", python="3.11", engine="emulated"),
    )


def _registration(identity: Identity, endpoint: str, accelerator: str = "rtx4090") -> bytes:
    payload = {"capability": _capability(identity, endpoint, accelerator).model_dump(mode="json")}
    return sign_envelope(identity, payload, purpose="register", now=time.time())


def test_canaries_go_to_unvetted_nodes_more_often() -> None:
    """Half the canaries go to a node not yet vetted (when there is one): held back from client traffic, it is
    vetted by canaries sooner."""
    from types import SimpleNamespace

    from gridserve.gateway.integrity.canary import CanaryRunner

    book = ReliabilityBook()
    for node in ("old1", "old2", "old3"):
        passed(book, node, 3)
    runner = CanaryRunner(SimpleNamespace(membership=SimpleNamespace(book=book)), None, None)  # type: ignore[arg-type]
    runner.rng = random.Random(7)
    targets = [("old1", "m"), ("old2", "m"), ("old3", "m"), ("new", "m")]
    picks = [runner.rng.choice(runner._unvetted(targets) or targets)[0] for _ in range(2000)]
    assert 0.55 < picks.count("new") / len(picks) < 0.70  # 0.5 + 0.5 x 1/4 = 0.625
    vetted_only = targets[:3]
    assert {runner.rng.choice(runner._unvetted(vetted_only) or vetted_only)[0] for _ in range(100)} == {
        "old1",
        "old2",
        "old3",
    }
